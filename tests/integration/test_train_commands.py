"""`mpcdp train`, `mpcdp audit` and `mpcdp demo digits` as a user runs them: real party-node
processes (localnet), real mTLS gRPC, real torch training on the CPU. The runs are real
command processes; the refusals and the budget reads go through the same typer app in this
process (`cli`), which saves a Python-and-torch start-up per check."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from typer.testing import CliRunner, Result

from mpcdp.cli.app import app
from mpcdp.demos import digits_demo
from mpcdp.local.localnet import LocalFederation, launch
from tests.conftest import with_default_sigint

pytestmark = pytest.mark.slow


def mpcdp(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpcdp.cli", *args], capture_output=True, text=True, check=check
    )


def cli(*args: str) -> Result:
    """The command's app in this process: exit code, stdout and stderr as the command's."""
    return CliRunner().invoke(app, list(args))


def budget_json(config: Path) -> Any:
    out = cli("budget", "--config", str(config), "--json")
    assert out.exit_code == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("digits")
    split = digits_demo.load_digits_split()
    toml = digits_demo.write_sites(root, split, budget=30.0, delta=1e-5)
    np.savez(root / "test.npz", x=split.test[0], y=split.test[1])
    np.savez(root / "members.npz", x=split.train[0], y=split.train[1])
    with pytest.MonkeyPatch.context() as env:
        # localnet's own cap (cores / parties), not the one-thread default of tests/conftest.py
        env.delenv("OMP_NUM_THREADS", raising=False)
        net = launch(workdir=root, datasets_toml=toml)
    with net:
        yield net


def test_train_then_audit_from_the_command_line(digits_net: LocalFederation) -> None:
    root = digits_net.workdir
    args = [
        "train", "--federation", str(digits_net.federation_config), "--dataset", "digits",
        "--model", "mlp:64,128,10", "--target-epsilon", "3", "--epochs", "4",
        "--batch-size", "64", "--lr", "0.03", "--eval", str(root / "test.npz"),
        "--checkpoint", str(root / "run.pt"), "--metrics", str(root / "metrics.json"),
        "--plot", str(root / "metrics.png"), "--seed", "1", "--site-eval-every", "2",
    ]  # fmt: skip
    out = mpcdp(*args)
    assert "done:" in out.stdout and "epsilon" in out.stdout
    # the sites scored the model on their own held-out splits after epochs 2 and 4
    assert "evaluations at the sites: 2 of 2 planned" in out.stdout
    assert out.stdout.count("at the sites: acc") == 2
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["epsilon"] <= 3.0 and metrics["plan"]["parties"] == list(digits_demo.SITES)
    assert metrics["evaluations_charged"] == dict.fromkeys(digits_demo.SITES, 2)
    evaluated = [r for r in metrics["history"] if r["site_loss"] is not None]
    assert [r["epoch"] for r in evaluated] == [2, 4]
    held_out = sum(len(np.load(root / s / "digits-test.npz")["y"]) for s in digits_demo.SITES)
    for r in evaluated:  # over the sites' public held-out counts
        assert r["site_examples"] == held_out and 0.0 <= r["site_accuracy"] <= 1.0
    assert metrics["final_accuracy"] > 0.5
    assert [r["epoch"] for r in metrics["history"]][:4] == [1, 2, 3, 4]
    assert (root / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rerunning with the finished checkpoint trains nothing more and spends nothing more
    site_a = digits_net.party_configs["site-a"]
    spent = budget_json(site_a)
    again = mpcdp(*args, "--json")
    assert json.loads(again.stdout)["steps_done"] == metrics["steps_done"]
    assert budget_json(site_a) == spent


def test_audit_from_the_command_line(digits_net: LocalFederation) -> None:
    """`mpcdp audit`: an audit run of its own (charged like any run), white-box canaries, the
    bound at confidence 1 - 1e-7 for delta 1e-12 (a chance failure <= 1e-7 by the paper's
    theorem), next to the accountant's epsilon at that delta. Target epsilon 1: its claim at
    delta 1e-12 is below the ceiling 600 canaries can show at that confidence (3.34), so the
    CLI's preflight lets the audit run (target 2 claims 4.43 there: refused as untestable)."""
    fed = str(digits_net.federation_config)
    site_a = digits_net.party_configs["site-a"]
    before = budget_json(site_a)
    args = [
        "audit", "--federation", fed, "--dataset", "digits", "--target-epsilon", "1",
        "--epochs", "2", "--canaries", "200", "--confidence", "0.9999999",
        "--audit-delta", "1e-12", "--seed", "2",
    ]  # fmt: skip
    obj = json.loads(mpcdp(*args, "--json").stdout)
    assert obj["m"] == 600 and obj["kind"] == "white-box" and obj["delta"] == 1e-12
    assert 0 <= obj["epsilon_lower_bound"] <= obj["claimed_epsilon"]
    assert obj["fraction_reached"] == pytest.approx(
        obj["epsilon_lower_bound"] / obj["claimed_epsilon"]
    )
    after = budget_json(site_a)
    assert after != before  # the audit run was charged
    text = mpcdp(*args[:-2], "--seed", "3").stdout
    for line in ("claimed epsilon (accountant)", "audit lower bound", "fraction reached",
                 "confidence", "canaries m", "guesses"):  # fmt: skip
        assert line in text


def test_train_errors_are_clear(digits_net: LocalFederation) -> None:
    fed = str(digits_net.federation_config)
    bad = cli("train", "--federation", fed, "--dataset", "nope")
    assert bad.exit_code == 1 and "dataset='nope': is not an example dataset" in bad.stderr
    bad = cli("train", "--federation", fed, "--dataset", "digits", "--epochs", "nan")
    assert bad.exit_code == 2 and "--epochs" in bad.stderr
    bad = cli("train", "--federation", fed, "--dataset", "digits", "--model", "resnet:1")
    assert bad.exit_code == 1 and "model" in bad.stderr and "resnet:1" in bad.stderr
    bad = cli("train", "--federation", fed, "--dataset", "digits", "--target-epsilon", "500")
    assert bad.exit_code == 1 and "RESOURCE_EXHAUSTED" in bad.stderr
    bad = cli("audit", "--federation", fed, "--dataset", "digits", "--canaries", "0")
    assert bad.exit_code == 2 and "--canaries" in bad.stderr
    bad = cli("audit", "--federation", fed, "--dataset", "digits", "--kind", "x")
    assert bad.exit_code == 2 and "--kind" in bad.stderr
    bad = cli("audit", "--federation", fed, "--dataset", "digits", "--canaries", "4000")
    assert bad.exit_code == 1 and "audit_canaries" in bad.stderr


def test_digits_demo_trains_to_the_expected_accuracy(tmp_path: Path) -> None:
    """The README's demo end to end: 3 site processes, epsilon 3, the full 20 epochs."""
    out = mpcdp("demo", "digits", "--out", str(tmp_path / "run"), "--json")
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["epsilon"] <= 3.0
    # 92.17 +- 1.24% over 8 seeds (BENCHMARKS.md); the noise is fresh every run, so the
    # threshold sits 9 std below the mean
    assert obj["final_accuracy"] >= 0.80
    assert obj["audit"] is None  # an audit is a run of its own: --audit-canaries
    for name in ("checkpoint.pt", "metrics.json", "metrics.png"):
        assert (tmp_path / "run" / name).exists()


def test_party_processes_share_the_machine_s_cores(digits_net: LocalFederation) -> None:
    """localnet caps each party's torch/OpenMP pool at cores / parties (digits_net launches
    them without an OMP_NUM_THREADS of the caller's)."""
    import os

    expected = str(max(1, (os.cpu_count() or 1) // 3))
    for proc in digits_net.processes.values():
        env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert f"OMP_NUM_THREADS={expected}".encode() in env


def test_results_a_user_keeps(digits_net: LocalFederation, tmp_path: Path) -> None:
    """Exactly the epochs asked; --plot on its own; the weights as a plain state_dict; a
    resume that says so; Ctrl-C that names the checkpoint."""
    import signal

    import torch

    from mpcdp.train.models import build_model

    exe = str(Path(sys.executable).parent / "mpcdp")
    root = digits_net.workdir
    base = [
        exe, "train", "--federation", str(digits_net.federation_config), "--dataset", "digits",
        "--model", "mlp:64,32,10", "--target-epsilon", "2", "--batch-size", "128",
        "--eval", str(root / "test.npz"), "--seed", "3",
    ]  # fmt: skip
    run = subprocess.run(
        [*base, "--epochs", "3", "--plot", str(tmp_path / "p.png"), "--save-model",
         str(tmp_path / "w.pt"), "--checkpoint", str(tmp_path / "c.pt")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    epochs = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("epoch")]
    assert epochs == ["1", "2", "3"]  # no 4th epoch of a leftover step
    # printed once, live as the epoch ended, and no progress bar when piped
    assert run.stdout.count("epoch   1") == 1 and "epoch" not in run.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    net = build_model("mlp:64,32,10")
    net.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    again = subprocess.run(
        [*base, "--epochs", "3", "--checkpoint", str(tmp_path / "c.pt")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "resuming run train-" in again.stderr and "at step" in again.stderr
    # SIGINT as a terminal delivers it: a child inherits an ignored or blocked SIGINT from
    # the test process (in the full suite it once ran all of its epochs and exited 0)
    proc = subprocess.Popen(
        with_default_sigint([*base, "--epochs", "400", "--checkpoint", str(tmp_path / "long.pt")]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = ""
    while "epoch   1" not in seen:
        chunk = proc.stdout.read(1)
        assert chunk, f"training ended early: {seen}"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted at step" in err and str(tmp_path / "long.pt") in err
    assert (tmp_path / "long.pt").exists()
