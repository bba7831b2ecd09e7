"""The ``mpcdp`` command line (typer): ``app`` assembles it; one module per command group,
named ``<command>_commands`` (``party_commands`` is ``mpcdp party``), so that no module shares
a name with a package of mpcdp (``mpcdp.party``, ``mpcdp.train``, ``mpcdp.protocol.query``).
"""
