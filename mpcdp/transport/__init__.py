"""gRPC transport: mTLS credentials, the thin Party servicer, the coordinator's client, and the
federation's certificate files (cert_files: the CA, one key and certificate per party and per
coordinator, written with safe modes).

Only this package (and mpcdp.party.node, mpcdp.federation, mpcdp.cli) imports grpc and protobuf.
"""
