"""Evaluation at the sites in a whole run (mpcdp.train.federated, mpcdp.train.planning): the
plan splits the target epsilon between steps and evaluations, the epoch records carry the
sites' noisy totals, every site's ledger holds exactly the steps and evaluations the result
counts, and a federation whose sites declare no held-out split is refused before any site is
asked. Bad options are refused with the option's name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from mpcdp.dp import accountant
from mpcdp.errors import BudgetExceededError, ParameterError
from mpcdp.federation import Federation
from mpcdp.protocol.training.evaluation import eval_event, eval_mu_for
from mpcdp.train.federated import train
from mpcdp.train.planning import plan_training
from tests.conftest import PARTIES, Net, build_net
from tests.training_support import MODEL, Direct, engines_of, examples_toml, tspec

HELD_OUT = 30

PLAN = dict(
    dataset="ex", model=MODEL, parties=PARTIES, examples=(40, 40, 40), num_params=75,
    target_epsilon=3.0, target_delta=1e-5, epochs=4, batch_size=30, max_grad_norm=1.0,
)  # fmt: skip


def test_the_plan_splits_the_target_between_steps_and_evaluations() -> None:
    plan = plan_training(**PLAN, site_eval_every=2, site_eval_epsilon=0.5)  # type: ignore[arg-type]
    assert plan.eval_every == 2 * plan.steps_per_epoch and plan.evaluations == 2
    assert plan.eval_words == 2  # cross-entropy: accuracy and loss
    alone = accountant.compose([eval_event(plan.eval_mu, words=2, count=2)], delta=1e-5).epsilon
    assert 0.49 <= alone <= 0.5  # the evaluations' part, calibrated to it
    both = plan.epsilon_after(plan.steps, evaluations=2)
    assert 2.95 <= both <= 3.0  # and the steps get the rest
    bare = plan_training(**PLAN)  # type: ignore[arg-type]
    assert plan.noise_multiplier > bare.noise_multiplier  # the steps pay for the evaluations
    assert plan.eval_mu == pytest.approx(eval_mu_for(plan.eval_noise_multiplier, words=2))
    default = plan_training(**PLAN, site_eval_every=1)  # type: ignore[arg-type]
    part = accountant.compose([eval_event(default.eval_mu, words=2, count=4)], delta=1e-5).epsilon
    assert 0.29 <= part <= 0.3  # a tenth of the target by default


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"site_eval_every": -1}, "site_eval_every"),
        ({"site_eval_every": 1.5}, "site_eval_every"),
        ({"site_eval_every": 1, "site_eval_epsilon": 3.0}, "site_eval_epsilon"),
        ({"site_eval_every": 1, "site_eval_epsilon": -0.1}, "site_eval_epsilon"),
        ({"site_eval_every": 1, "site_eval_epsilon": math.nan}, "site_eval_epsilon"),
        ({"site_eval_epsilon": 0.3}, "site_eval_epsilon"),
        ({"site_eval_every": 1, "site_eval_loss_bound": 0.0}, "site_eval_loss_bound"),
        ({"site_eval_every": 1, "site_eval_loss_bound": math.inf}, "site_eval_loss_bound"),
        # noise the sites' samplers could not draw exactly
        ({"site_eval_every": 1, "site_eval_epsilon": 1e-9}, "site_eval_epsilon"),
    ],
)
def test_bad_evaluation_options_are_refused_by_name(options: dict[str, object], name: str) -> None:
    with pytest.raises(ParameterError, match=name):
        plan_training(**PLAN, **options)  # type: ignore[arg-type]


def test_a_run_reports_the_sites_totals_and_the_ledgers_hold_what_it_counts(
    tmp_path: Path,
) -> None:
    net = build_net(tmp_path, start=False, extra=examples_toml(tmp_path, held_out=HELD_OUT))
    try:
        engines = engines_of(net)
        result = train(
            clients=[Direct(e) for e in engines.values()],
            dataset="ex", model=MODEL, examples=dict.fromkeys(PARTIES, 40),
            target_epsilon=8.0, target_delta=1e-5, epochs=4, batch_size=30,
            learning_rate=0.1, seed=5, site_eval_every=2, site_eval_epsilon=2.0,
            held_out=dict.fromkeys(PARTIES, HELD_OUT),
        )  # fmt: skip
        plan = result.plan
        assert result.evaluations_charged == dict.fromkeys(PARTIES, 2)
        evaluated = [r for r in result.history if r.site_loss is not None]
        assert [r.epoch for r in evaluated] == [2, 4]
        for r in evaluated:
            assert r.site_eval_parties == PARTIES and r.site_examples == 3 * HELD_OUT
            assert r.site_accuracy is not None and 0.0 <= r.site_accuracy <= 1.0
            assert r.site_loss is not None and 0.0 <= r.site_loss <= plan.eval_loss_bound
        assert result.final_accuracy == evaluated[-1].site_accuracy  # no coordinator test set
        for p, node in net.nodes.items():
            charges = node.ledger.charges("ex")
            assert sum("eval-" in c.query_id for c in charges) == 2
            spent = node.ledger.status("ex").spent_epsilon
            assert spent == pytest.approx(result.site_epsilon[p], rel=1e-6)
        assert result.epsilon <= 8.0
    finally:
        net.stop()


def test_a_run_without_the_sites_held_out_counts_is_refused_before_any_site_is_asked(
    sites: Net,
) -> None:
    engines = engines_of(sites)
    for held_out in (None, {"alice": 30}, dict.fromkeys(PARTIES, 0)):
        with pytest.raises(ParameterError, match="held_out"):
            train(
                clients=[Direct(e) for e in engines.values()],
                dataset="ex", model=MODEL, examples=dict.fromkeys(PARTIES, 40),
                target_epsilon=8.0, target_delta=1e-5, epochs=1, batch_size=30,
                site_eval_every=1, held_out=held_out,
            )  # fmt: skip
    for e in engines.values():
        assert e.ledger.charges("ex") == []


def test_an_evaluation_whose_noise_costs_more_than_the_budget_is_refused_at_open(
    tmp_path: Path,
) -> None:
    net = build_net(tmp_path, start=False, extra=examples_toml(tmp_path, held_out=HELD_OUT))
    try:
        alice = engines_of(net)["alice"]
        spec = tspec(eval_every=2, eval_mu=1e-6, eval_loss_bound=1.0)
        with pytest.raises(BudgetExceededError):
            alice.open(session_id=b"\x01" * 16, spec=spec, coordinator="analyst")
        assert alice.ledger.charges("ex") == [] and alice.ledger.reserved_epsilon("ex") == 0.0
    finally:
        net.stop()


def test_a_federation_without_held_out_splits_is_refused_before_any_site_is_asked(
    tmp_path: Path,
) -> None:
    net = build_net(tmp_path, extra=examples_toml(tmp_path))
    try:
        with Federation.from_config(net.federation) as fed:
            with pytest.raises(ParameterError, match=r"site_eval_every.*declare no held-out"):
                fed.train(
                    dataset="ex", model=MODEL, target_epsilon=3.0, target_delta=1e-5,
                    epochs=1, batch_size=30, site_eval_every=1,
                )  # fmt: skip
        for node in net.nodes.values():
            assert node.ledger.charges("ex") == []
    finally:
        net.stop()


def test_describe_tells_how_many_examples_each_held_out_split_holds(tmp_path: Path) -> None:
    net = build_net(tmp_path, extra=examples_toml(tmp_path, held_out=HELD_OUT))
    try:
        with Federation.from_config(net.federation) as fed:
            for resp in fed.describe().values():
                (ex,) = [d for d in resp.datasets if d.name == "ex"]
                assert (ex.length, ex.held_out) == (40, HELD_OUT)
    finally:
        net.stop()


def test_a_federation_asks_describe_once_for_all_the_public_numbers_of_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Example counts, held-out counts and the declared shape come from one Describe round."""
    net = build_net(tmp_path, extra=examples_toml(tmp_path, held_out=HELD_OUT))
    try:
        with Federation.from_config(net.federation) as fed:
            calls: list[int] = []
            describe = fed.describe

            def counted() -> dict[str, object]:
                calls.append(1)
                return describe()  # type: ignore[return-value]

            monkeypatch.setattr(fed, "describe", counted)
            # refused after Describe, before any site is asked to train: too few canaries
            with pytest.raises(ParameterError, match="audit_canaries=4"):
                fed.train(
                    dataset="ex", model=MODEL, target_epsilon=3.0, target_delta=1e-5,
                    epochs=1, batch_size=30, site_eval_every=1, audit_canaries=4,
                    audit_kind="black-box",
                )  # fmt: skip
            assert len(calls) == 1
        for node in net.nodes.values():
            assert node.ledger.charges("ex") == []
    finally:
        net.stop()
