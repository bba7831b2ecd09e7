"""The ``mpcdp`` command line (typer), one module per command group."""
