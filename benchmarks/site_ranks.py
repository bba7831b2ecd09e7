"""Step time of a site's clipped sum on 2 ranks against 1 rank (torch.distributed, gloo, CPU).

Run:  python -m benchmarks.site_ranks [--batch 512] [--repeat 5] [--threads 1] [--width 512]

Starts a 2-rank group as torchrun would (two processes on this machine, gloo), and at rank 0
times, interleaved round by round in the same run: rank 0 alone computing the clipped sum of
a Poisson batch (the 1-rank site), and the 2-rank site (:class:`mpcdp.train.ranks.RankGroup`,
each rank half of the batch, reduce to rank 0). Each rank uses ``--threads`` torch threads,
so on a 2-core machine the 2-rank site uses both cores and the 1-rank site one. Prints the
best times and their ratio; absolute times are for this machine only. The model is an MLP
784-W-W-10 (``--width``), cross-entropy, C = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import torch
    from pathlib import Path
    from mpcdp.config.datasets import Examples
    from mpcdp.protocol.training import TrainSpec
    from mpcdp.train.ranks import RankGroup, serve_worker
    from mpcdp.train.gradient_source import TorchGradientSource

    args = json.loads(os.environ["BENCH_ARGS"])
    torch.set_num_threads(args["threads"])
    X = torch.randn(20 * args["batch"], 784, generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, 10, (X.shape[0],), generator=torch.Generator().manual_seed(2))

    def build(description):
        torch.manual_seed(3)
        w = description["width"]
        model = torch.nn.Sequential(torch.nn.Linear(784, w), torch.nn.ReLU(),
                                    torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, 10))
        spec = TrainSpec(
            run_id="b", dataset="d", model="m", parties=("a", "b"), sample_rate=0.5, steps=1,
            max_grad_norm=1.0, scale_bits=0, mu=1.0, num_params=1,
        )
        examples = Examples(path=Path("memory"), x=X.numpy(), y=Y.numpy(), num_classes=10)
        return TorchGradientSource(model=model, spec=spec, examples=examples, device="cpu")

    if os.environ["RANK"] != "0":
        serve_worker(build=build, device=torch.device("cpu"), backend="gloo")
        sys.exit(0)
    group = RankGroup.from_env(backend="gloo")
    description = {"width": args["width"]}
    own = build(description)
    group.open(key="b", description=description)
    out = torch.empty(own.clipper.num_params)
    rng = np.random.default_rng(4)
    one, two = [], []
    for r in range(args["repeat"] + 1):
        idx = np.flatnonzero(rng.random(X.shape[0]) < args["batch"] / X.shape[0])
        t0 = time.perf_counter()
        own.clipped_sum(idx, scale=1.0, out=out)
        t1 = time.perf_counter()
        group.clipped_sum(key="b", indices=idx, scale=1.0, own=own, out=out)
        t2 = time.perf_counter()
        if r:  # the first round warms up
            one.append(t1 - t0)
            two.append(t2 - t1)
    group.stop()
    print(json.dumps({"one": min(one), "two": min(two)}))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
        BENCH_ARGS=json.dumps(vars(args)), PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )  # fmt: skip
    worker = subprocess.Popen([sys.executable, "-c", SCRIPT], env=dict(env, RANK="1"))
    leader = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=dict(env, RANK="0"), capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    worker.wait(timeout=60)
    times = json.loads(leader.stdout.strip().splitlines()[-1])
    print(
        f"batch {args.batch}, MLP 784-{args.width}-"
        f"{args.width}-10, {args.threads} torch thread(s) per rank, best of {args.repeat}"
    )
    print(f"{'site':<8} {'step ms':>9} {'ratio':>7}")
    print(f"{'1 rank':<8} {times['one'] * 1e3:>9.1f} {1.0:>7.2f}")
    print(f"{'2 ranks':<8} {times['two'] * 1e3:>9.1f} {times['two'] / times['one']:>7.2f}")


if __name__ == "__main__":
    main()
