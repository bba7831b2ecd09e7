"""One budget per data: party.toml's ``budget = "..."`` lets dataset entries over the same data
draw on one ledger budget; two entries that read the same data (the same resolved file, table
or declared Dataset with the same options) and name different budgets are refused when the
config is read, as are entries sharing a budget with different epsilon, delta or shares. The
ledger side: entries mapped onto one budget row, and an entry's old budget merged into the
shared one without forgetting a charge."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mpcdp.config.party_config import load_party_config
from mpcdp.dp import events as ev
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import BudgetExceededError, ConfigError, LedgerError, ParameterError

HEAD = """
id = "alice"
listen = "127.0.0.1:0"
ledger = "l.sqlite"
[tls]
ca = "ca.pem"
cert = "alice.pem"
key = "alice.key"
coordinators = ["analyst", "other"]
"""


def _party(tmp_path: Path, body: str) -> Path:
    np.savez(tmp_path / "ex.npz", x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "code").mkdir(exist_ok=True)
    (tmp_path / "t.csv").write_text("a\n1\n")
    cfg = tmp_path / "alice.toml"
    cfg.write_text(HEAD + body)
    return cfg


def _npz(name: str, path: str = "ex.npz", *, eps: float = 3.0, extra: str = "") -> str:
    return (
        f'\n[datasets.{name}]\npath = "{path}"\nnum_classes = 2\nepsilon = {eps}\n'
        f"delta = 1e-5\n{extra}\n"
    )


def _declared(name: str, *, seed: int = 0, extra: str = "") -> str:
    return (
        f'\n[datasets.{name}]\npython_path = "code"\nmodel = "m:make"\ndata = "d:make"\n'
        f"epsilon = 3.0\ndelta = 1e-5\n{extra}\n[datasets.{name}.data_options]\nseed = {seed}\n"
    )


def test_the_default_budget_is_the_dataset_s_own_name(tmp_path: Path) -> None:
    cfg = load_party_config(_party(tmp_path, _npz("a") + _npz("b", extra='budget = "a"')))
    assert cfg.datasets["a"].budget == "a"
    assert cfg.datasets["b"].budget == "a"
    assert cfg.datasets["b"].budget_name == "a" and cfg.datasets["a"].budget_name == ""


@pytest.mark.parametrize("second", ["ex.npz", "./ex.npz", "sub/../ex.npz"])
def test_two_entries_over_the_same_file_without_a_shared_budget_are_refused(
    tmp_path: Path, second: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_party_config(_party(tmp_path, _npz("a") + _npz("b", second)))
    text = str(exc.value)
    assert "datasets 'a' and 'b' both read the file" in text
    assert str((tmp_path / "ex.npz").resolve()) in text
    assert "budgets 'a' and 'b'" in text
    assert 'Declare budget = "a" in both' in text


def test_two_entries_naming_two_other_budgets_over_the_same_file_are_refused(
    tmp_path: Path,
) -> None:
    body = _npz("a", extra='budget = "x"') + _npz("b", extra='budget = "y"')
    with pytest.raises(ConfigError, match="draw on budgets 'x' and 'y'"):
        load_party_config(_party(tmp_path, body))
    body = _npz("a", extra='budget = "x"') + _npz("b", extra='budget = "x"')
    cfg = load_party_config(_party(tmp_path, body))
    assert {ds.budget for ds in cfg.datasets.values()} == {"x"}


def test_two_table_entries_over_the_same_csv_are_refused(tmp_path: Path) -> None:
    table = (
        '\n[datasets.{n}]\npath = "t.csv"\nepsilon = 1.0\n{b}\n'
        "[datasets.{n}.columns.a]\nlower = 0\nupper = 5\n"
    )
    with pytest.raises(ConfigError, match="datasets 't1' and 't2' both read the file"):
        load_party_config(_party(tmp_path, table.format(n="t1", b="") + table.format(n="t2", b="")))
    shared = table.format(n="t1", b="") + table.format(n="t2", b='budget = "t1"')
    assert load_party_config(_party(tmp_path, shared)).datasets["t2"].budget == "t1"


def test_two_declared_datasets_with_the_same_factory_and_options_are_refused(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_party_config(_party(tmp_path, _declared("a") + _declared("b")))
    assert "both read the Dataset d:make(seed=0)" in str(exc.value)
    assert 'Declare budget = "a" in both' in str(exc.value)
    # other options read other data: a budget each
    cfg = load_party_config(_party(tmp_path, _declared("a") + _declared("b", seed=1)))
    assert (cfg.datasets["a"].budget, cfg.datasets["b"].budget) == ("a", "b")
    shared = _declared("a") + _declared("b", extra='budget = "a"')
    assert load_party_config(_party(tmp_path, shared)).datasets["b"].budget == "a"


@pytest.mark.parametrize(
    ("b_keys", "what"),
    [
        ("delta = 1e-6", "1e-05, {} against 3.0, 1e-06"),
        ("delta = 1e-5\n[datasets.b.coordinator_shares]\nanalyst = 0.5", "Fraction(1, 2)"),
    ],
)
def test_entries_sharing_a_budget_must_declare_the_same_budget(
    tmp_path: Path, b_keys: str, what: str
) -> None:
    b = '\n[datasets.b]\npath = "sub/../ex.npz"\nnum_classes = 2\nepsilon = 3.0\nbudget = "a"\n'
    with pytest.raises(ConfigError) as exc:
        load_party_config(_party(tmp_path, _npz("a") + b + b_keys + "\n"))
    text = str(exc.value)
    assert "datasets 'a' and 'b' share budget 'a' but declare different" in text
    assert what in text and "declare the same in both" in text


def test_entries_sharing_a_budget_with_different_epsilon_are_refused(tmp_path: Path) -> None:
    body = _npz("a") + _npz("b", eps=5.0, extra='budget = "a"')
    with pytest.raises(ConfigError, match=r"datasets\.b\.budget: datasets 'a' and 'b' share"):
        load_party_config(_party(tmp_path, body))


def test_a_budget_named_after_a_dataset_that_draws_on_another_is_refused(tmp_path: Path) -> None:
    body = (
        _npz("a", extra='budget = "pool"')
        + _npz("b", "sub/../ex.npz", extra='budget = "pool"')
        + (
            '\n[datasets.c]\npath = "t.csv"\nepsilon = 3.0\ndelta = 1e-5\nbudget = "a"\n'
            "[datasets.c.columns.a]\nlower = 0\nupper = 5\n"
        )
    )
    with pytest.raises(ConfigError, match="'a' is dataset 'a', which draws on budget 'pool'"):
        load_party_config(_party(tmp_path, body))


@pytest.mark.parametrize("value", ['""', "3", '"a\\u0007"'])
def test_a_bad_budget_name_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"datasets\.a\.budget"):
        load_party_config(_party(tmp_path, _npz("a", extra=f"budget = {value}")))


# -- the ledger --------------------------------------------------------------------------------


def _pure(eps: str) -> ev.PureDp:
    return ev.PureDp(epsilon=Fraction(eps))


def test_entries_mapped_onto_one_budget_spend_one_balance(tmp_path: Path) -> None:
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("a", epsilon=1.0, delta=1e-6)
        led.share_budgets({"a": "a", "b": "a"})
        led.charge(dataset="a", query_id="q1", event=_pure("0.6"))
        assert led.status("b").spent_epsilon == pytest.approx(0.6)
        with pytest.raises(BudgetExceededError):
            led.reserve(dataset="b", query_id="q2", event=_pure("0.5"))
        led.reserve(dataset="b", query_id="q3", event=_pure("0.4"))
        with pytest.raises(BudgetExceededError):  # q3's reservation counts on entry a too
            led.check(dataset="a", event=_pure("0.1"))
        led.charge(dataset="b", query_id="q3", event=_pure("0.4"), reserved=True)
        assert led.datasets() == ["a"]
        assert [c.query_id for c in led.charges("b")] == ["q1", "q3"]
        assert led.status("a").remaining_epsilon == 0


def test_share_budgets_refuses_a_missing_budget_and_a_chain(tmp_path: Path) -> None:
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("a", epsilon=1.0, delta=1e-6)
        with pytest.raises(ParameterError, match="has no budget"):
            led.share_budgets({"b": "nowhere"})
        led.set_budget("b", epsilon=1.0, delta=1e-6)
        with pytest.raises(ParameterError, match="names a shared budget"):
            led.share_budgets({"b": "a", "c": "b"})


def test_merging_an_entry_s_old_budget_keeps_every_charge(tmp_path: Path) -> None:
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        for name in ("a", "b"):
            led.set_budget(name, epsilon=1.0, delta=1e-6)
        led.charge(dataset="a", query_id="qa", event=_pure("0.7"))
        led.charge(dataset="b", query_id="qb", event=_pure("0.5"))
        led.reserve(dataset="b", query_id="held", event=_pure("0.1"))
        with pytest.raises(LedgerError, match="reservations in flight"):
            led.merge_budget("b", into="a")
        led.release("held")
        assert led.merge_budget("b", into="a") == 1
        assert led.datasets() == ["a"]
        status = led.status("a")
        assert status.spent_epsilon == pytest.approx(1.2) and status.queries == 2
        with pytest.raises(BudgetExceededError):  # over budget now: nothing more
            led.charge(dataset="a", query_id="q", event=_pure("0.01"))
        with pytest.raises(ParameterError, match="must differ"):
            led.merge_budget("a", into="a")
    with BudgetLedger(tmp_path / "l.sqlite") as again:  # the totals still add up (verify)
        assert again.status("a").queries == 2
