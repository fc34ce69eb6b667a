"""``python -m lmms_lostattn``: the ``lostattn`` command."""

from lmms_lostattn.cli import main

main()
