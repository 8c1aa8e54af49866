"""``python -m imdsguard``."""

from imdsguard.cli import main_exit

main_exit()
