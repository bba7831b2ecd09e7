"""Several models per data: a site's party.toml lists the model factories a coordinator may
name (``models``) and the options it may set within declared ranges (``model_choices``); the
coordinator tries another model or width without any site editing its config, on the one
budget of that data, and whatever is outside what a site declared is refused before anything
is charged. Real party nodes over loopback mTLS, real SQLite ledgers, real torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from mpcdp.config.party_config import load_party_config
from mpcdp.config.training_config import ModelChoice
from mpcdp.errors import ConfigError, ParameterError, RoundAborted
from mpcdp.federation import Federation
from mpcdp.protocol.training.train_spec import decode_model_options, encode_model_options
from mpcdp.transport import codec
from tests.conftest import PARTIES, build_net
from tests.integration.test_declared_training import MODELS, dataset_toml, party_file, user_code
from tests.training_support import example_data, tspec

CHOICES = (
    "[datasets.ex.model_choices]\nwidth = { min = 4, max = 16 }\n"
    'act = { choices = ["relu", "tanh"] }\n'
)


def _net(root: Path) -> object:
    user_code(root)
    extra = {}
    for i, p in enumerate(PARTIES):
        x, y = example_data(i)
        np.savez(root / f"{p}.npz", x=x, y=y)
        extra[p] = dataset_toml(
            "ex",
            f'path = "{p}.npz"\nnum_classes = 3\nmodels = ["{MODELS}:make", "{MODELS}:deep"]',
            tables=CHOICES,
        )
    return build_net(root, extra=extra)


def _charges(net: object, party: str) -> int:
    return len(net.nodes[party].ledger.charges("ex"))  # type: ignore[attr-defined]


def test_a_coordinator_tries_two_models_and_two_widths_without_any_site_editing_its_config(
    tmp_path: Path,
) -> None:
    net = _net(tmp_path)
    runs = []
    try:
        with Federation.from_config(net.federation) as fed:  # type: ignore[attr-defined]
            for model, options in (
                (f"{MODELS}:make", {"width": 4}),
                (f"{MODELS}:make", {"width": 12, "act": "tanh"}),
                (f"{MODELS}:deep", {"width": 8}),
            ):
                result = fed.train(
                    dataset="ex", model=model, model_options=options,
                    python_path=tmp_path / "code", target_epsilon=3.0, target_delta=1e-5,
                    epochs=1, batch_size=12,
                )  # fmt: skip
                runs.append(result)
        sizes = [r.plan.num_params for r in runs]
        assert sizes == [8 * 4 + 4 + 4 * 3 + 3, 8 * 12 + 12 + 12 * 3 + 3, sizes[2]]
        assert sizes[2] > sizes[0]  # the deeper model
        # one budget: every run charged the same dataset row at every site
        for p in PARTIES:
            assert _charges(net, p) == len(runs)
    finally:
        net.stop()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("model", "options", "refusal"),
    [
        ("make", {"width": 32}, "model option width=32 must be in [4, 16] here"),
        ("make", {"width": 3}, "model option width=3 must be in [4, 16] here"),
        ("make", {"act": "gelu"}, "model option act='gelu' must be one of ['relu', 'tanh']"),
        ("make", {"inputs": 8}, "may not set model option 'inputs' here (it may set: ['act', "),
        ("regressor", {}, f"trains models ['{MODELS}:deep', '{MODELS}:make']"),
    ],
)  # fmt: skip
def test_what_a_site_did_not_declare_is_refused_before_anything_is_charged(
    tmp_path: Path, model: str, options: dict[str, object], refusal: str
) -> None:
    net = _net(tmp_path)
    try:
        with Federation.from_config(net.federation) as fed:  # type: ignore[attr-defined]
            with pytest.raises(RoundAborted) as err:
                fed.train(
                    dataset="ex", model=f"{MODELS}:{model}", model_options=options,
                    python_path=tmp_path / "code", target_epsilon=3.0, target_delta=1e-5,
                    epochs=1, batch_size=12,
                )  # fmt: skip
        assert refusal in str(err.value)
        for p in PARTIES:
            assert _charges(net, p) == 0
    finally:
        net.stop()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (f'model = "{MODELS}:make"\nmodels = ["{MODELS}:make"]', "either model (one factory)"),
        ('models = ["not a path"]', "'not a path' is not an import path"),
        ("models = []", "must list 1 to 64 model factories"),
        (f'models = ["{MODELS}:make", "{MODELS}:make"]', "lists a factory twice"),
        (f'models = ["{MODELS}:make"]\n[datasets.t.model_choices]\nwidth = {{ min = 9, max = 4 }}',
         "model_choices.width"),
        (f'models = ["{MODELS}:make"]\n[datasets.t.model_choices]\nwidth = {{ lo = 1 }}',
         "must be { min = A, max = B } or { choices = [...] }"),
        (f'models = ["{MODELS}:make"]\n[datasets.t.model_options]\nwidth = 4\n'
         "[datasets.t.model_choices]\nwidth = { min = 1, max = 9 }",
         "is also in model_options"),
        (f'models = ["{MODELS}:make"]\n[datasets.t.model_choices]\nact = {{ choices = [] }}',
         "choices must list 1 to 256"),
    ],
)  # fmt: skip
def test_party_toml_refuses_malformed_model_lists_and_choices(
    tmp_path: Path, body: str, message: str
) -> None:
    cfg = party_file(tmp_path, f'\n[datasets.t]\npython_path = "code"\n{body}\n')
    text = cfg.read_text()
    # the budget keys go in the dataset's own table, before any sub-table
    cfg.write_text(text.replace("[datasets.t]\n", "[datasets.t]\nepsilon = 1.0\ndelta = 1e-5\n"))
    with pytest.raises(ConfigError) as exc:
        load_party_config(cfg)
    assert message in str(exc.value)


def test_a_choice_checks_type_range_and_values() -> None:
    width = ModelChoice(name="width", minimum=4, maximum=16, integer=True)
    scale = ModelChoice(name="scale", minimum=0.0, maximum=1.0)
    act = ModelChoice(name="act", choices=("relu", "tanh"))
    flag = ModelChoice(name="flag", choices=(True,))
    assert [width.refusal(v) for v in (4, 16, 6.5, 17, True, "8")] == [
        "",
        "",
        "must be an integer",
        "must be in [4, 16]",
        "must be a number",
        "must be a number",
    ]
    assert [scale.refusal(v) for v in (0, 0.5, 1.5)] == ["", "", "must be in [0, 1]"]
    assert act.refusal("relu") == "" and "one of" in act.refusal("gelu")
    assert flag.refusal(True) == "" and flag.refusal(1) != ""  # 1 is not True here


def test_model_options_travel_canonical_and_strict() -> None:
    text = encode_model_options({"width": 8, "act": "relu", "scale": 0.5, "bias": True})
    assert text == '{"act":"relu","bias":true,"scale":0.5,"width":8}'
    spec = tspec(model_options=text)
    assert codec.train_spec_from_pb(codec.train_spec_to_pb(spec)) == spec
    assert spec.options() == {"act": "relu", "bias": True, "scale": 0.5, "width": 8}
    for bad, why in (
        ('{"width": 8}', "canonical"),
        ("[1]", "JSON object"),
        ('{"1x":1}', "keyword argument"),
        ('{"w":[1]}', r"model_options\.w"),
        ("nope", "is not JSON"),
    ):
        with pytest.raises(ParameterError, match=why):
            decode_model_options(bad)
    with pytest.raises(ParameterError, match=r"model_options\.w"):
        encode_model_options({"w": float("nan")})
