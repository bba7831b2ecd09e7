"""Plaintext baseline party for benchmarks/secure_sum.py: same transport, no secrecy.

Run (the benchmark starts it):
    python -m benchmarks.plaintext_party --config party.toml --port-file F

It reads the same party.toml (mTLS certificates, the vector dataset) and serves the same
Party gRPC service over the same mTLS channel, but Contribute streams the party's float32
vector in the clear: what a plaintext federated average sends. Benchmark use only: it reveals
the party's data to the coordinator by design.

With ``--train-model`` (benchmarks/federation_overhead.py) it also serves TrainStep for the
party's example dataset, in the clear: it loads the parameters the coordinator sends,
Poisson-samples its examples at ``--sample-rate``, sums the per-example gradients clipped to
``--max-grad-norm`` with the same book-keeping clipper, and streams that float32 sum back, with
no rounding, noise share or mask: plaintext federated DP-SGD with the noise added centrally,
over the same transport. With ``--transport-only`` as well, TrainStep skips the gradient
(the parameters are received and decoded, zeros of the same length are sent back): what the
transport and the coordinator's loop cost alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mpcdp import PROTOCOL_VERSION
from mpcdp.config.datasets import load_examples, load_vector
from mpcdp.config.party_config import load_federation_config, load_party_config
from mpcdp.local.localnet import LocalFederation
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.transport import codec, tls

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Running:
    """Plaintext parties started by :func:`running`: a stub and a pid per party."""

    stubs: dict[str, pb_grpc.PartyStub]
    pids: dict[str, int]


@contextlib.contextmanager
def running(
    net: LocalFederation, parties: Sequence[str], *args: str, threads: int | None = None
) -> Iterator[Running]:
    """One plaintext party process per party of ``net`` (its party.toml, certificates and
    data), with extra command-line ``args`` and, when given, OMP_NUM_THREADS=``threads``;
    connected over the same mTLS as the analyst; stopped on exit."""
    env = dict(os.environ) if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    channels: list[grpc.Channel] = []
    try:
        for p in parties:
            port_file = net.workdir / p / "plain-port"
            port_file.unlink(missing_ok=True)
            procs[p] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.plaintext_party",
                    *("--config", str(net.party_configs[p])),
                    *("--port-file", str(port_file)),
                    *args,
                ],
                cwd=ROOT,
                env=env,
            )
        creds = tls.load_credentials(load_federation_config(net.federation_config).tls)
        stubs = {}
        for p in parties:
            port_file = net.workdir / p / "plain-port"
            while not port_file.exists() or not port_file.read_text().strip():
                time.sleep(0.05)
            channels.append(
                tls.channel(f"127.0.0.1:{int(port_file.read_text())}", creds=creds, server_name=p)
            )
            stubs[p] = pb_grpc.PartyStub(channels[-1])  # type: ignore[no-untyped-call]
        yield Running(stubs=stubs, pids={p: pr.pid for p, pr in procs.items()})
    finally:
        for ch in channels:
            ch.close()
        for pr in procs.values():
            pr.terminate()
            pr.wait(timeout=30)


class _ClearSite:
    """A site's clipped gradient sums, in the clear (benchmark only)."""

    def __init__(
        self,
        *,
        model: str,
        examples: Any,
        sample_rate: float,
        max_grad_norm: float,
        transport_only: bool = False,
    ):
        import torch

        from mpcdp.train.clipping import PerSampleClipper
        from mpcdp.train.models import build_model

        self.torch = torch
        self.net = build_model(model)
        self.clipper = PerSampleClipper(self.net, max_grad_norm=max_grad_norm)
        self.all = list(self.net.parameters())
        self.x = torch.from_numpy(examples.x)
        self.y = torch.from_numpy(examples.y)
        self.q = sample_rate
        self.rng = np.random.default_rng()  # benchmark only: the batch is not secret here
        # one sum buffer, as mpcdp's site keeps (no page faults for a fresh 10^7-vector)
        self.total = torch.zeros(self.clipper.num_params, dtype=torch.float32)
        self.transport_only = transport_only

    @property
    def total_params(self) -> int:
        return int(sum(p.numel() for p in self.all))

    def step(self, values: np.ndarray, *, full: bool) -> np.ndarray:
        torch = self.torch
        if self.transport_only:
            zeros: np.ndarray = self.total.numpy()
            return zeros
        flat = torch.from_numpy(values)
        if full:
            torch.nn.utils.vector_to_parameters(flat, self.all)
        else:
            self.clipper.load_flat_parameters(flat)
        idx = torch.from_numpy(np.flatnonzero(self.rng.random(len(self.y)) < self.q))
        out = self.clipper.clipped_grad_sum(
            inputs=self.x[idx],
            targets=self.y[idx],
            loss_fn=lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none"),
            check_inputs=False,
            out=self.total,
        )
        result: np.ndarray = out.grad_sum.numpy()
        return result


class PlaintextParty(pb_grpc.PartyServicer):
    def __init__(
        self, party_id: str, vector: np.ndarray | None, site: _ClearSite | None = None
    ) -> None:
        self.party_id = party_id
        self.vector = vector
        self.site = site

    def TrainStep(self, request_iterator: Any, context: Any) -> Iterator[pb.ContributeChunk]:
        assert self.site is not None
        site = self.site
        session_id, header, _, values = codec.decode_step_requests(
            request_iterator, max_values=lambda _sid: site.total_params
        )
        grad = site.step(values, full=header.full)
        yield from self._stream(session_id, grad, header.chunk_bytes)

    def Contribute(self, request: Any, context: Any) -> Iterator[pb.ContributeChunk]:
        assert self.vector is not None
        data = self.vector.astype(np.float32)  # the baseline sends float32
        yield from self._stream(request.session_id, data, request.chunk_bytes)

    def _stream(
        self, session_id: bytes, data: np.ndarray, chunk_bytes: int
    ) -> Iterator[pb.ContributeChunk]:
        yield pb.ContributeChunk(
            version=PROTOCOL_VERSION,
            session_id=session_id,
            header=pb.ContributionHeader(party_id=self.party_id, length=data.size),
        )
        raw = data.view(np.uint8).data
        step = chunk_bytes or codec.DEFAULT_CHUNK_BYTES
        for start in range(0, len(raw), step):
            yield pb.ContributeChunk(
                version=PROTOCOL_VERSION,
                session_id=session_id,
                data=bytes(raw[start : start + step]),
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--train-model", default=None, help="serve TrainStep for this model")
    parser.add_argument("--sample-rate", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--transport-only", action="store_true", help="TrainStep sends zeros")
    args = parser.parse_args()
    cfg = load_party_config(args.config)
    vector = next((d for d in cfg.datasets.values() if d.kind == "vector"), None)
    site = None
    if args.train_model:
        ds = next(d for d in cfg.datasets.values() if d.kind == "examples")
        site = _ClearSite(
            model=args.train_model,
            examples=load_examples(ds.path, num_classes=ds.num_classes),
            sample_rate=args.sample_rate,
            max_grad_norm=args.max_grad_norm,
            transport_only=args.transport_only,
        )
    creds = tls.load_credentials(cfg.tls)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=tls.GRPC_OPTIONS)
    pb_grpc.add_PartyServicer_to_server(
        PlaintextParty(
            cfg.id, load_vector(vector.path).values if vector is not None else None, site
        ),
        server,
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
