"""A training session cannot lock another coordinator out of its share: real party processes
(`mpcdp party serve`) on loopback with mTLS, an honest coordinator (analyst) and a hostile
one (mallory) that opens a training session (TrainOpen reserves its first block) and never
steps.

With coordinator shares in party.toml, mallory's idle session holds at most its own share:
a second session beyond that share is refused, naming the share, and the analyst's session
whose whole run takes all of its own share is accepted at every site while mallory's block
is held. Without shares, the analyst's refusal says that other coordinators' reservations
hold the budget, and never names mallory.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from mpcdp.dp import accountant
from mpcdp.errors import PartyError
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.training import TrainSpec
from mpcdp.protocol.training.train_spec import run_event
from mpcdp.transport.client import GrpcPartyClient
from tests.conftest import coordinator_clients
from tests.training_support import example_data, tspec

pytestmark = pytest.mark.slow

PARTIES = ("alice", "bob", "carlos")
DELTA = 1e-5


def _spec(run_id: str, **kw: object) -> TrainSpec:
    # one run: 4 steps charged in blocks of 2 (TrainOpen reserves the first 2)
    return tspec(run_id=run_id, dataset=kw.pop("dataset", "shared"), parties=PARTIES, **kw)


def _run_epsilon() -> float:
    return accountant.compose([run_event(_spec("x"))], delta=DELTA).epsilon


def _datasets(workdir: Path) -> dict[str, str]:
    """shared: each coordinator's half holds one whole run (1% to spare), not one and a
    half; pool (no shares): one whole run, not two."""
    run = _run_epsilon()
    out = {}
    for i, p in enumerate(PARTIES):
        (workdir / p).mkdir(parents=True, exist_ok=True)
        x, y = example_data(i)
        for name in ("shared", "pool"):  # two datasets over two files: a budget each
            np.savez(workdir / p / f"{name}.npz", x=x, y=y)
        table = 'path = "{name}.npz"\nnum_classes = 3\nepsilon = {eps!r}\ndelta = {delta}\n'
        out[p] = (
            "[datasets.shared]\n"
            + table.format(name="shared", eps=2 * 1.01 * run, delta=DELTA)
            + "[datasets.shared.coordinator_shares]\nanalyst = 0.5\nmallory = 0.5\n"
            + "[datasets.pool]\n"
            + table.format(name="pool", eps=1.01 * run, delta=DELTA)
        )
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("training-reservations")
    fed = launch(
        workdir=workdir,
        datasets_toml=_datasets(workdir),
        other_coordinators=["mallory"],
        deadline_s=60,
    )
    try:
        yield fed
    finally:
        fed.stop()


def _clients(net: LocalFederation, coordinator: str) -> list[GrpcPartyClient]:
    return coordinator_clients(net.federation_config, net.workdir, coordinator, deadline_s=60)


def _open(clients: list[GrpcPartyClient], spec: TrainSpec) -> list[str]:
    """TrainOpen ``spec`` at every site and never step: what each site answered."""
    session_id = secrets.token_bytes(16)
    answers = []
    for c in clients:
        try:
            c.train_open(session_id=session_id, spec=spec)
            answers.append("accepted")
        except PartyError as exc:
            answers.append(f"{exc.code}: {exc}")
    return answers


def test_an_idle_training_session_holds_only_its_coordinators_share(
    net: LocalFederation,
) -> None:
    mallory, analyst = _clients(net, "mallory"), _clients(net, "analyst")
    try:
        # mallory opens a run that takes its whole share, reserves its first block, and
        # never steps
        assert _open(mallory, _spec("grab")) == ["accepted"] * 3
        # a second run does not fit its share beside the block it holds
        beyond = _open(mallory, _spec("more"))
        assert all(a.startswith("RESOURCE_EXHAUSTED") and "share" in a for a in beyond), beyond
        assert all("'mallory'" in a for a in beyond)
        # the analyst's run, all of its own share, is accepted at every site meanwhile
        assert _open(analyst, _spec("mine")) == ["accepted"] * 3
    finally:
        for c in (*mallory, *analyst):
            c.close()


def test_without_shares_the_refusal_says_other_coordinators_hold_the_budget(
    net: LocalFederation,
) -> None:
    mallory, analyst = _clients(net, "mallory"), _clients(net, "analyst")
    try:
        # mallory's run is one block: all of it is reserved at TrainOpen, and held
        whole = _spec("all-of-it", dataset="pool", steps_per_charge=4)
        assert _open(mallory, whole) == ["accepted"] * 3
        # the analyst's run would fit the budget alone, not beside mallory's block
        answers = _open(analyst, _spec("mine", dataset="pool"))
        assert all(a.startswith("RESOURCE_EXHAUSTED") for a in answers), answers
        assert all("other coordinators' reservations" in a for a in answers), answers
        assert not any("mallory" in a for a in answers)
    finally:
        for c in (*mallory, *analyst):
            c.close()
