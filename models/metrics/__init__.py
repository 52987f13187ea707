"""Evaluation metrics: the likelihood zoo's (:mod:`models.metrics.likelihood`) and disentanglement's
(:mod:`models.metrics.disentanglement`)."""
