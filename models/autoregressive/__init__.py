"""Autoregressive models on MNIST: PixelCNN++, PixelSNAIL, PixelVAE, VLAE (the Gated PixelCNN is
:class:`vaekernels.nn.GatedPixelCNN`)."""
