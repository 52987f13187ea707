"""Reference models built on vaekernels, with loaders for the standard datasets they train on.

- :mod:`models.data`: MNIST (IDX ``.gz``) and statically binarised MNIST (``.mat``) loaders, and
  dynamic binarisation.
- :mod:`models.iwae`: the IWAE / VAE of Burda et al. (2016); ``python -m models.iwae --help``.
"""
