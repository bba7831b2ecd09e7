"""The round protocol, transport-agnostic (docs/design.md, "Round protocol").

- ``spec``: the query an analyst asks and its canonical digest.
- ``identity``: signing and verifying ephemeral keys with the parties' certificates.
- ``plan``: what a query releases (tensors, fixed point, sensitivities, calibrated noise).
- ``party``: a party's session state machine (propose -> contribute).
- ``coordinator``: the coordinator's round (propose all -> contribute all -> reveal).

No module here imports grpc or protobuf; mpcdp.transport maps these onto the wire.
"""
