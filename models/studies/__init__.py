"""The studies ``python -m models study NAME`` runs (:data:`models.cli.STUDIES`)."""
