"""What ``mpcdp train`` prints, piped (not a terminal): one line per epoch, printed once,
with each site's steps and epsilon so far when the run reports them; a roster change on
stderr as it happens; --step-deadline and --max-pause passed on, bad values named. The
federation is a stand-in that plays a run's callbacks, so only the command is tested here
(the real run: test_train_commands)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from mpcdp.cli.app import app
from mpcdp.protocol.training.roster import RosterChange
from mpcdp.train.planning import TrainingPlan
from mpcdp.train.results import EpochRecord, StepInfo, TrainingResult

PLAN = TrainingPlan(
    dataset="digits", model="mlp:64,128,10", parties=("a", "b"), examples=(100, 100),
    colluders=0, sample_rate=0.1, steps=20, steps_per_epoch=10, max_grad_norm=1.0,
    clipping="flat", bias_only=False, noise_multiplier=1.0, scale_bits=10, mu=1e4,
    num_params=10, target_epsilon=3.0, target_delta=1e-5,
)  # fmt: skip


def _record(epoch: int, *, sites: bool) -> EpochRecord:
    return EpochRecord(
        epoch=epoch,
        step=10 * epoch,
        epsilon=1.5 * epoch,
        test_accuracy=0.5 + 0.1 * epoch,
        test_loss=1.0 / epoch,
        seconds=1.0,
        participation={"a": 10, "b": 10 - epoch} if sites else {},
        site_epsilon={"a": 1.5 * epoch, "b": 1.4 * epoch} if sites else {},
    )


class FakeFederation:
    """Plays a two-epoch run's callbacks in order and keeps what train() was given."""

    sites: ClassVar[bool] = True
    given: ClassVar[dict[str, Any]] = {}

    def __enter__(self) -> FakeFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def train(self, **kw: Any) -> TrainingResult:
        FakeFederation.given = kw
        history = []
        for epoch in (1, 2):
            for step in range(10 * epoch - 9, 10 * epoch + 1):
                kw["on_step"](StepInfo(step=step, steps=20, epsilon=0.15 * step, seconds=0.1))
                if step == 15:
                    change = RosterChange(step=15, left={"b": "did not answer"})
                    logging.getLogger("mpcdp.protocol.training.roster").warning(change.text())
                    kw["on_roster_change"](change)
            history.append(_record(epoch, sites=self.sites))
            kw["on_epoch"](history[-1])
        return TrainingResult(
            plan=PLAN, run_id="train-1", steps_done=20, epsilon=3.0, delta=1e-5,
            history=tuple(history), final_accuracy=0.7, public_accuracy=None, state_dict={},
        )  # fmt: skip


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeFederation]]:
    from mpcdp import federation

    monkeypatch.setattr(federation.Federation, "from_config", lambda path: FakeFederation())
    FakeFederation.sites = True
    FakeFederation.given = {}
    yield FakeFederation


def train(*args: str) -> Any:
    return CliRunner().invoke(
        app, ["train", "--federation", "f.toml", "--dataset", "digits", *args]
    )


def test_piped_output_is_one_line_per_epoch_with_the_sites(fake: type[FakeFederation]) -> None:
    out = train()
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert [li.split()[:2] for li in lines[:2]] == [["epoch", "1"], ["epoch", "2"]]
    assert len(lines) == 3 and lines[2].startswith("done: 20 steps")  # no table repeated
    assert lines[0].endswith("sites: a 10 steps eps 1.500, b 9 steps eps 1.400")
    assert "step" not in out.stderr.replace("step 15:", "")  # no progress lines
    assert out.stderr.count("epoch") == 0


def test_no_site_figures_when_the_run_reports_none(fake: type[FakeFederation]) -> None:
    fake.sites = False
    out = train()
    assert out.exit_code == 0, out.output
    assert "sites:" not in out.stdout
    assert out.stdout.splitlines()[0].endswith("test loss 1.0000")


def test_json_keeps_stdout_for_the_object(fake: type[FakeFederation]) -> None:
    import json

    out = train("--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["steps_done"] == 20
    assert out.stderr.count("epoch   1") == 1 and out.stderr.count("epoch   2") == 1


def test_a_roster_change_is_reported_as_it_happens(
    fake: type[FakeFederation], caplog: pytest.LogCaptureFixture
) -> None:
    out = train()
    assert "roster: step 15: b left out (did not answer)" in out.stderr
    assert out.stderr.count("roster:") == 1
    # said once: the roster's own warning of the same change is held back
    assert not [r for r in caplog.records if r.name == "mpcdp.protocol.training.roster"]
    assert logging.getLogger("mpcdp.protocol.training.roster").level == logging.NOTSET


def test_step_deadline_and_max_pause_are_passed_on(fake: type[FakeFederation]) -> None:
    assert train("--step-deadline", "7.5", "--max-pause", "60").exit_code == 0
    assert fake.given["step_deadline_s"] == 7.5 and fake.given["max_pause_s"] == 60
    assert train().exit_code == 0
    # not given: the training loop's own default
    assert fake.given["step_deadline_s"] is None and "max_pause_s" not in fake.given


@pytest.mark.parametrize(
    ("option", "value"), [("--step-deadline", "0"), ("--max-pause", "-1"), ("--max-pause", "inf")]
)
def test_bad_deadlines_are_named(fake: type[FakeFederation], option: str, value: str) -> None:
    out = train(option, value)
    assert out.exit_code == 2 and option in out.stderr and value in out.stderr
    assert fake.given == {}  # refused before the federation was asked


def test_the_plot_labels_the_users_metric(fake: type[FakeFederation], tmp_path: Path) -> None:
    out = train("--plot", str(tmp_path / "p.png"), "--metric", "mine:f1")
    assert out.exit_code == 0, out.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
