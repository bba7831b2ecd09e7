"""``python -m mpcdp``: the ``mpcdp`` command."""

from mpcdp.cli.app import main

main()
