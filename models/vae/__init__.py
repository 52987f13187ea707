"""The likelihood-based VAE family (:mod:`models.vae.zoo`)."""
