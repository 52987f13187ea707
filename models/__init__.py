"""Reference models built on vaekernels, with loaders for the standard datasets they train on.

``python -m models list`` shows every model; ``python -m models train MODEL`` trains one
(:mod:`models.cli`, :mod:`models.registry`, :mod:`models.training`).
"""
