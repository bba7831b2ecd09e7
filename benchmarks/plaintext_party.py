"""Plaintext baseline party for benchmarks/secure_sum.py: same transport, no secrecy.

Run (the benchmark starts it):
    python -m benchmarks.plaintext_party --config party.toml --port-file F

It reads the same party.toml (mTLS certificates, the vector dataset) and serves the same
Party gRPC service over the same mTLS channel, but Contribute streams the party's float32
vector in the clear: what a plaintext federated average sends. Benchmark use only: it reveals
the party's data to the coordinator by design.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mpcdp import PROTOCOL_VERSION
from mpcdp.config import load_party_config
from mpcdp.datasets import load_vector
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.transport import codec, tls


class PlaintextParty(pb_grpc.PartyServicer):
    def __init__(self, party_id: str, vector: np.ndarray) -> None:
        self.party_id = party_id
        self.vector = vector

    def Contribute(self, request: Any, context: Any) -> Iterator[pb.ContributeChunk]:
        data = self.vector.astype(np.float32)  # the baseline sends float32
        yield pb.ContributeChunk(
            version=PROTOCOL_VERSION,
            session_id=request.session_id,
            header=pb.ContributionHeader(party_id=self.party_id, length=data.size),
        )
        raw = data.view(np.uint8).data
        step = request.chunk_bytes or codec.DEFAULT_CHUNK_BYTES
        for start in range(0, len(raw), step):
            yield pb.ContributeChunk(
                version=PROTOCOL_VERSION,
                session_id=request.session_id,
                data=bytes(raw[start : start + step]),
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_party_config(args.config)
    dataset = next(d for d in cfg.datasets.values() if d.kind == "vector")
    creds = tls.load_credentials(cfg.tls)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=tls.GRPC_OPTIONS)
    pb_grpc.add_PartyServicer_to_server(
        PlaintextParty(cfg.id, load_vector(dataset.path).values), server
    )
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(creds))
    server.start()
    args.port_file.write_text(f"{port}\n")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    while not done.wait(1.0):
        pass
    server.stop(1).wait()


if __name__ == "__main__":
    main()
