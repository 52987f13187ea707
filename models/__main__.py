"""``python -m models``: the reference models' command line (:mod:`models.cli`)."""

from models.cli import main

main()
