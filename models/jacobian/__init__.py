"""Decoder-Jacobian regularised autoencoders: GRAE, GRAE*."""
