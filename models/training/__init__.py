"""What every model's training shares: the :class:`~models.training.trainer.Trainer` (run directories,
checkpoints and exact resume, budgets, progress, DDP) and the PNG grids of :mod:`models.training.pictures`."""
