"""gRPC transport: mTLS credentials, the thin Party servicer, the coordinator's client.

Only this package (and mpcdp.node, mpcdp.federation, mpcdp.cli) imports grpc and protobuf.
"""
