"""mpcdp: secure multiparty aggregation with distributed differential privacy.

Importing this package does nothing but define names: no randomness is drawn, no file,
socket or thread is opened. Submodules are imported explicitly, e.g.
``from mpcdp import sharing`` or ``from mpcdp.dp import samplers``.
"""

__version__ = "0.1.0"

#: Wire/protocol version. It is bound into every key derivation (see mpcdp.mpc.prg), so shares
#: from two protocol versions can never be mixed by accident.
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
