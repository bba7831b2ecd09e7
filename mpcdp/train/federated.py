"""Federated DP-SGD, the coordinator's loop: plan, calibrate, step, evaluate, checkpoint.

One call trains a model across sites (see :func:`train`). The coordinator holds the replica
that counts: it applies the optimizer to the revealed noisy sum and sends the new parameters
with the next step, so every site's replica is bit-identical to it whatever the sites' devices
(a departure from "every site applies the update", written up in the README; the bytes on the
wire are the same as broadcasting the aggregate).

Privacy, per site and per example, by one accountant (mpcdp.dp.accountant): each of T steps
Poisson-samples every site's examples with rate q, and the sum of all sites' clipped, rounded
gradients gets Skellam(mu) noise from the h = n - t honest sites; :func:`plan_training`
calibrates mu for (target_epsilon, target_delta) with the quantization sensitivity included
(protocol.training.sensitivities). The update is ``noisy_sum / (2^k * q * N)``: the noisy
sum divided by the expected batch size, as in DP-SGD with Poisson sampling
(Abadi et al. 2016; Opacus' "expected batch size").

Warm start (AdaMix-style public pre-training; Golatkar et al. 2022, "Mixed differential
privacy in computer vision", CVPR): given ``public_data``, the coordinator first trains
non-privately on it, then DP on the sites.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch.utils.data import Dataset

from mpcdp import ring
from mpcdp.audit.bound import OneRunAudit
from mpcdp.audit.canaries import AUDIT_KINDS, MAX_CANARIES
from mpcdp.dp import accountant, rdp
from mpcdp.errors import ParameterError
from mpcdp.protocol.training import (
    TrainingClient,
    TrainingSession,
    TrainSpec,
    choose_scale_bits,
    max_batch_size,
    sensitivities,
    step_event,
)
from mpcdp.train.audit import black_box_scores, finish, white_box_scorer
from mpcdp.train.clipping import PerSampleClipper
from mpcdp.train.models import build_model
from mpcdp.train.run_model import (
    evaluate_any,
    evaluate_metric,
    model_factory_for,
    with_declared_model,
)

__all__ = [
    "EpochRecord",
    "StepInfo",
    "TrainingPlan",
    "TrainingResult",
    "plan_training",
    "set_flat_gradients",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainingPlan:
    """Everything fixed before the first step; stored in checkpoints (resume must match)."""

    dataset: str
    model: str
    parties: tuple[str, ...]
    examples: tuple[int, ...]  # per site, in party order
    colluders: int
    sample_rate: float
    steps: int
    steps_per_epoch: int
    max_grad_norm: float
    clipping: str
    bias_only: bool
    noise_multiplier: float  # Skellam std / Delta_2 (in integer units)
    scale_bits: int
    mu: float
    num_params: int
    target_epsilon: float
    target_delta: float
    ring_bits: int = 32
    audit_canaries: int = 0  # per site; an audit run (mpcdp.train.audit) when > 0
    audit_kind: str = ""

    @property
    def total_examples(self) -> int:
        return sum(self.examples)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.total_examples

    @property
    def honest(self) -> int:
        return len(self.parties) - self.colluders

    @property
    def noise_std(self) -> float:
        """Std of the total noise in gradient units when every site adds its share."""
        n = len(self.parties)
        return math.sqrt(self.mu * n / self.honest) / 2.0**self.scale_bits

    def spec(self, *, run_id: str, start_step: int, steps: int) -> TrainSpec:
        return TrainSpec(
            run_id=run_id,
            dataset=self.dataset,
            model=self.model,
            parties=self.parties,
            colluders=self.colluders,
            sample_rate=self.sample_rate,
            steps=steps,
            start_step=start_step,
            steps_per_charge=self.steps_per_epoch,
            max_grad_norm=self.max_grad_norm,
            clipping=self.clipping,
            bias_only=self.bias_only,
            scale_bits=self.scale_bits,
            mu=self.mu,
            num_params=self.num_params,
            ring_bits=self.ring_bits,
            audit_canaries=self.audit_canaries,
            audit_kind=self.audit_kind,
        )

    def epsilon_after(self, steps: int, *, delta: float | None = None) -> float:
        """The accountant's epsilon (at ``delta``, default target_delta) after ``steps``
        steps."""
        if steps <= 0:
            return 0.0
        ordinary = TrainingPlan(**{**asdict(self), "audit_canaries": 0, "audit_kind": ""})
        event = step_event(ordinary.spec(run_id="plan", start_step=0, steps=1), steps=1)
        one = accountant.rdp_curve(event)
        at = self.target_delta if delta is None else delta
        eps, _ = rdp.to_epsilon(orders=rdp.DEFAULT_ORDERS, rdp=one * steps, delta=at)
        return eps


def plan_training(
    *,
    dataset: str,
    model: str,
    parties: Sequence[str],
    examples: Sequence[int],
    num_params: int,
    target_epsilon: float,
    target_delta: float,
    epochs: float,
    batch_size: int,
    max_grad_norm: float,
    colluders: int = 1,
    clipping: str = "flat",
    bias_only: bool = False,
    ring_bits: int = 32,
    audit_canaries: int = 0,
    audit_kind: str = "",
) -> TrainingPlan:
    """Sampling rate, steps, gradient scale and Skellam mu for a target (eps, delta).

    q = batch_size / N (N = all sites' examples), an epoch is round(1 / q) steps and
    T = round(epochs * round(1 / q)), so the run ends on the epoch asked. The noise multiplier
    z is the smallest with eps(Skellam((z Delta_2)^2), q, T) <= target; Delta_2 depends on
    the scale 2^k, which the ring's headroom bounds given z, so the two are solved together.
    With ``audit_canaries`` per site, every site's batch bound counts them as examples.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ParameterError("target_epsilon", target_epsilon, "must be finite and > 0")
    if not 0 < target_delta < 1:
        raise ParameterError("target_delta", target_delta, "must be in (0, 1)")
    if not epochs > 0 or not math.isfinite(epochs):
        raise ParameterError("epochs", epochs, "must be finite and > 0")
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        raise ParameterError("max_grad_norm", max_grad_norm, "must be finite and > 0")
    if len(examples) != len(parties) or any(e < 1 for e in examples):
        raise ParameterError("examples", list(examples), "need >= 1 example at every site")
    total = sum(examples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size:
        raise ParameterError("batch_size", batch_size, "must be an int >= 1")
    if batch_size > total:
        raise ParameterError("batch_size", batch_size, f"exceeds the {total} examples")
    q = batch_size / total
    # an epoch is round(1/q) steps, and the run is exactly the epochs asked: 20 epochs end at
    # epoch 20 (ceil(epochs / q) made a 21st epoch of a step or two)
    steps_per_epoch = max(1, round(1 / q))
    steps = max(1, round(epochs * steps_per_epoch))
    n, h = len(parties), len(parties) - colluders
    max_total = sum(max_batch_size(examples=e + audit_canaries, sample_rate=q) for e in examples)

    def z_for(k: int) -> float:
        l2, l1 = sensitivities(max_grad_norm=max_grad_norm, scale_bits=k, num_params=num_params)
        return accountant.get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=q,
            steps=steps,
            mechanism="skellam",
            l2_sensitivity=l2,
            l1_sensitivity=l1,
        )

    z = accountant.get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=q, steps=steps
    )
    k = choose_scale_bits(
        max_grad_norm=max_grad_norm,
        num_params=num_params,
        max_total_batch=max_total,
        n_parties=n,
        honest=h,
        noise_multiplier=1.25 * z,
        ring_bits=ring_bits,
    )
    z = z_for(k)
    while k > 0:  # the Skellam z is a little above the Gaussian one: recheck the headroom
        fits = choose_scale_bits(
            max_grad_norm=max_grad_norm,
            num_params=num_params,
            max_total_batch=max_total,
            n_parties=n,
            honest=h,
            noise_multiplier=z,
            ring_bits=ring_bits,
        )
        if fits >= k:
            break
        k = fits
        z = z_for(k)
    l2, _ = sensitivities(max_grad_norm=max_grad_norm, scale_bits=k, num_params=num_params)
    return TrainingPlan(
        dataset=dataset,
        model=model,
        parties=tuple(parties),
        examples=tuple(int(e) for e in examples),
        colluders=colluders,
        sample_rate=q,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        max_grad_norm=float(max_grad_norm),
        clipping=clipping,
        bias_only=bias_only,
        noise_multiplier=z,
        scale_bits=k,
        mu=(z * l2) ** 2,
        num_params=num_params,
        target_epsilon=float(target_epsilon),
        target_delta=float(target_delta),
        ring_bits=ring_bits,
        audit_canaries=audit_canaries,
        audit_kind=audit_kind,
    )


@dataclass(frozen=True)
class StepInfo:
    """Progress after one step (for progress bars)."""

    step: int
    steps: int
    epsilon: float
    seconds: float


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    step: int
    epsilon: float
    test_accuracy: float | None
    test_loss: float | None
    seconds: float
    test_metric: float | None = None  # the user's metric (train's ``metric``), when given


@dataclass(frozen=True)
class TrainingResult:
    plan: TrainingPlan
    run_id: str
    steps_done: int
    epsilon: float
    delta: float
    history: tuple[EpochRecord, ...]
    final_accuracy: float | None
    public_accuracy: float | None  # after the warm start, before DP (None without one)
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    audit: OneRunAudit | None = None  # an audit run's bound (mpcdp.train.audit)

    def to_json(self) -> dict[str, Any]:
        audit = None
        if self.audit is not None:
            audit = {
                **asdict(self.audit),
                "kind": self.plan.audit_kind,
                "fraction_reached": self.audit.fraction_reached,
            }
        return {
            "audit": audit,
            "run_id": self.run_id,
            "plan": {**asdict(self.plan), "noise_std": self.plan.noise_std},
            "steps_done": self.steps_done,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "final_accuracy": self.final_accuracy,
            "public_accuracy": self.public_accuracy,
            "history": [asdict(r) for r in self.history],
        }


Arrays = tuple[NDArray[Any], NDArray[Any]]


def evaluate(
    model: torch.nn.Module, data: Arrays, *, batch_size: int = 2048
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``data`` = (x, y)."""
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(data[0], dtype=np.float32))
    y = torch.as_tensor(np.asarray(data[1], dtype=np.int64))
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(y), batch_size):
            out = model(x[s : s + batch_size].to(device))
            t = y[s : s + batch_size].to(device)
            loss += float(F.cross_entropy(out, t, reduction="sum"))
            correct += int((out.argmax(dim=1) == t).sum())
    model.train(was)
    n = max(len(y), 1)
    return correct / n, loss / n


def set_flat_gradients(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Give each parameter, in order, its slice of the 1-D ``flat`` as ``.grad`` (a view,
    cast to the parameter's dtype only where it differs)."""
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise ParameterError(
            "flat", f"shape {tuple(flat.shape)}", f"must be 1-D with {total} values"
        )
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def pretrain_public(
    model: torch.nn.Module,
    data: Arrays,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> None:
    """Non-private SGD (momentum 0.9) on public examples: the warm start. Every parameter
    trains here, also those a bias-only DP phase keeps frozen afterwards."""
    x = torch.as_tensor(np.asarray(data[0], dtype=np.float32))
    y = torch.as_tensor(np.asarray(data[1], dtype=np.int64))
    params = list(model.parameters())
    frozen = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=learning_rate, momentum=0.9)
    model.train()
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=generator)
            for s in range(0, len(y), batch_size):
                i = perm[s : s + batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x[i]), y[i]).backward()  # type: ignore[no-untyped-call]
                opt.step()
    finally:
        for p, flag in zip(params, frozen, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def _make_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ParameterError("optimizer", name, "must be 'sgd' or 'adam'")


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint


def train(
    *,
    clients: Sequence[TrainingClient],
    dataset: str,
    model: str,
    examples: Mapping[str, int],
    target_epsilon: float,
    target_delta: float,
    epochs: float,
    max_grad_norm: float = 1.0,
    batch_size: int = 64,
    learning_rate: float = 0.03,
    optimizer: Literal["sgd", "adam"] = "sgd",
    momentum: float = 0.9,
    clipping: Literal["flat", "automatic"] = "flat",
    bias_only: bool = False,
    colluders: int = 1,
    eval_data: Arrays | Dataset[Any] | None = None,
    public_data: Arrays | None = None,
    public_epochs: int = 0,
    public_learning_rate: float = 0.05,
    public_mixing: float = 1.0,
    public_batch_size: int = 64,
    checkpoint: Path | None = None,
    run_id: str | None = None,
    seed: int | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_resume: Callable[[str, int, int], None] | None = None,
    stop_after: int | None = None,
    model_factory: Callable[[str], torch.nn.Module] = build_model,
    loss: str = "cross_entropy",
    metric: str = "",
    python_path: str | Path | Sequence[str | Path] = (),
    model_options: Mapping[str, Any] | None = None,
    audit_canaries: int = 0,
    audit_kind: Literal["white-box", "black-box"] = "white-box",
    audit_confidence: float = 0.95,
    audit_delta: float | None = None,
    feature_shape: tuple[int, ...] = (),
    num_classes: int = 0,
) -> TrainingResult:
    """Train ``model`` on every site's ``dataset`` with federated DP-SGD.

    ``examples`` maps each site (in federation order) to its number of examples (public
    metadata from Describe). ``batch_size`` is the expected total batch per step. With
    ``checkpoint``, the run saves after every epoch and, when the file exists, resumes from
    it (same plan required). ``stop_after`` stops after that many steps in this call (for
    interruption tests and demos); the checkpoint then holds the progress. ``on_step`` is
    called after every step, ``on_epoch`` after every epoch (with its evaluation), and
    ``on_resume(run_id, step, steps)`` once when the run resumes from ``checkpoint``.
    ``metric``: the import path of ``fn(outputs, targets) -> number``, computed on
    ``eval_data`` after every epoch (``EpochRecord.test_metric``), next to the test loss
    and (for cross-entropy) accuracy; it is checked on the initial model before any step.
    ``model_factory`` builds the module from ``model`` (default: the registry of
    mpcdp.train.models); the sites must build the same (PartyNode's ``model_factory``).
    A ``model`` that is an import path ``package.module:factory`` is imported (from the
    ``python_path`` folders first) and called as ``factory(model, **model_options)``: the
    sites declare the same path in party.toml, and each refuses a model whose architecture
    fingerprint differs from this one's. ``loss`` ("cross_entropy", "mse" or an import
    path) must be the sites' declared loss; ``eval_data`` (arrays or a Dataset of (x, y))
    reports accuracy for cross-entropy, the mean loss always (mpcdp.train.run_model).

    With ``public_data``: a non-private warm start of ``public_epochs`` on it, then every DP
    step adds ``public_mixing`` times the gradient of a random public batch to the revealed
    private gradient (AdaMix's second phase trains on public and private data jointly; the
    public term is computed by the coordinator, on public data, at no privacy cost).

    With ``audit_canaries`` > 0 the run is a one-run audit (mpcdp.train.audit): each site
    takes that many canaries of ``audit_kind``, the result's ``audit`` holds the bound at
    ``audit_confidence`` for ``audit_delta`` (default target_delta) next to the accountant's
    epsilon at that delta. An audit run is one session: it is never resumed from a
    checkpoint, and ``stop_after`` is refused. Black-box canaries need the sites'
    ``feature_shape`` and ``num_classes`` (Describe; Federation.train fills them in).
    """
    parties = tuple(examples)
    _check_audit(
        audit_canaries=audit_canaries,
        audit_kind=audit_kind,
        audit_confidence=audit_confidence,
        audit_delta=audit_delta,
        feature_shape=feature_shape,
        num_classes=num_classes,
        stop_after=stop_after,
        checkpoint=checkpoint,
    )
    if set(parties) != {c.party_id for c in clients}:
        raise ParameterError(
            "examples", sorted(parties), f"must name the clients {[c.party_id for c in clients]}"
        )
    model_factory = model_factory_for(
        model, default=model_factory, python_path=python_path, model_options=model_options
    )
    if public_data is not None and loss != "cross_entropy":
        raise ParameterError("public_data", "given", f"needs loss='cross_entropy', not {loss!r}")
    gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(62))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        net = model_factory(model).cpu()  # the coordinator's replica lives on the CPU
    clipper = PerSampleClipper(
        net, max_grad_norm=max_grad_norm, clipping=clipping, bias_only=bias_only
    )
    trainable = [p for _, p in clipper.named_parameters()]
    everything = list(net.parameters())
    plan = plan_training(
        dataset=dataset,
        model=model,
        parties=parties,
        examples=[examples[p] for p in parties],
        num_params=clipper.num_params,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        epochs=epochs,
        batch_size=batch_size,
        max_grad_norm=max_grad_norm,
        colluders=colluders,
        clipping=clipping,
        bias_only=bias_only,
        audit_canaries=audit_canaries,
        audit_kind=audit_kind if audit_canaries else "",
    )
    opt = _make_optimizer(optimizer, trainable, learning_rate, momentum)
    history: list[EpochRecord] = []
    start = 0
    public_accuracy: float | None = None
    if metric:  # a bad path or value fails now, before any site is asked or charged
        if eval_data is None:
            raise ParameterError("metric", metric, "needs eval_data to be computed on")
        evaluate_metric(net, eval_data, metric=metric, python_path=python_path)
    run = run_id or f"train-{secrets.token_hex(6)}"
    if checkpoint is not None and checkpoint.exists():
        state = _read_checkpoint(checkpoint)
        saved = _plan_from(state["plan"])
        if saved != plan:
            diff = [k for k in asdict(plan) if asdict(plan)[k] != asdict(saved)[k]]
            raise ParameterError(
                "checkpoint", str(checkpoint), f"was made with a different plan (differs in {diff})"
            )
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        history = [EpochRecord(**r) for r in state["history"]]
        run = state["run_id"]
        public_accuracy = state.get("public_accuracy")
        log.info("resuming run %s at step %d of %d", run, start, plan.steps)
        if on_resume is not None:
            on_resume(run, start, plan.steps)
    elif public_data is not None and public_epochs > 0:
        pretrain_public(
            net,
            public_data,
            epochs=public_epochs,
            learning_rate=public_learning_rate,
            generator=gen,
        )
        if eval_data is not None:
            public_accuracy, _ = evaluate_any(net, eval_data, loss=loss, python_path=python_path)
    if not public_mixing >= 0 or not math.isfinite(public_mixing):
        raise ParameterError("public_mixing", public_mixing, "must be finite and >= 0")
    mix: tuple[torch.Tensor, torch.Tensor] | None = None
    if public_data is not None and public_mixing > 0:
        mix = (
            torch.as_tensor(np.asarray(public_data[0], dtype=np.float32)),
            torch.as_tensor(np.asarray(public_data[1], dtype=np.int64)),
        )
    end = plan.steps if stop_after is None else min(plan.steps, start + stop_after)
    t0 = time.perf_counter()
    revealed: dict[str, NDArray[np.bool_]] = {}
    scorer = None
    if start < end:
        spec = plan.spec(run_id=run, start_step=start, steps=plan.steps - start)
        spec = with_declared_model(spec, factory=model_factory, loss=loss)
        if plan.audit_kind == "white-box":
            scorer = white_box_scorer(spec=spec)
        session = TrainingSession(spec=spec, clients=clients)
        session.open()
        try:
            full = True
            # one buffer each for the parameters sent (float32 on the wire: cat casts into
            # it), the summed words and the gradient (a fresh 10^7-vector per step costs more
            # in page faults than the pass over it)
            n = sum(p.numel() for p in trainable)
            sent = torch.empty(n, dtype=torch.float32)
            words = np.empty(n, dtype=ring.dtype_for(plan.ring_bits))
            grad = torch.empty(n, dtype=torch.float32)
            scale = 1.0 / (2.0**plan.scale_bits * plan.expected_batch_size)
            for step in range(start, end):
                if full:  # the first step carries every parameter, frozen ones too
                    flat = torch.nn.utils.parameters_to_vector(everything).detach()
                else:
                    flat = torch.cat([p.detach().reshape(-1) for p in trainable], out=sent)
                total = session.step(parameters=flat.numpy(), full=full, out=words)
                full = False
                if scorer is not None:
                    scorer.update(total)
                # integer units -> the averaged gradient, in one float32 pass (float32 rounds
                # each value by at most 2^-24 relative: post-processing of the release)
                set_flat_gradients(trainable, grad.copy_(torch.from_numpy(total)).mul_(scale))
                if mix is not None:
                    pick = torch.randint(
                        0, len(mix[1]), (min(public_batch_size, len(mix[1])),), generator=gen
                    )
                    public_loss = F.cross_entropy(net(mix[0][pick]), mix[1][pick])
                    for p, g in zip(
                        trainable, torch.autograd.grad(public_loss, trainable), strict=True
                    ):
                        assert p.grad is not None
                        p.grad.add_(g, alpha=public_mixing)
                opt.step()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                if on_step is not None:
                    on_step(
                        StepInfo(
                            step=done,
                            steps=plan.steps,
                            epsilon=plan.epsilon_after(done),
                            seconds=time.perf_counter() - t0,
                        )
                    )
                if done % plan.steps_per_epoch == 0 or done == plan.steps or done == end:
                    acc, test_loss = (
                        evaluate_any(net, eval_data, loss=loss, python_path=python_path)
                        if eval_data is not None
                        else (None, None)
                    )
                    rec = EpochRecord(
                        epoch=math.ceil(done / plan.steps_per_epoch),
                        step=done,
                        epsilon=plan.epsilon_after(done),
                        test_accuracy=acc,
                        test_loss=test_loss,
                        seconds=time.perf_counter() - t0,
                        test_metric=(
                            evaluate_metric(net, eval_data, metric=metric, python_path=python_path)
                            if metric and eval_data is not None
                            else None
                        ),
                    )
                    if history and history[-1].step == done:
                        history[-1] = rec
                    else:
                        history.append(rec)
                    if checkpoint is not None:  # saved before it is reported
                        _save(
                            checkpoint,
                            {
                                "format": CHECKPOINT_FORMAT,
                                "plan": asdict(plan),
                                "model": net.state_dict(),
                                "optimizer": opt.state_dict(),
                                "step": done,
                                "run_id": run,
                                "history": [asdict(r) for r in history],
                                "public_accuracy": public_accuracy,
                            },
                        )
                    if on_epoch is not None:
                        on_epoch(rec)
            revealed = session.audit_inclusion
        finally:
            session.close()
    done = max(start, end)
    final = history[-1].test_accuracy if history else None
    report = None
    if plan.audit_canaries and revealed:
        scores = (
            scorer.score_sets()
            if scorer is not None
            else black_box_scores(
                model=net, spec=spec, feature_shape=feature_shape, num_classes=num_classes
            )
        )
        at = plan.target_delta if audit_delta is None else audit_delta
        report = finish(
            scores=scores,
            included=revealed,
            spec=spec,
            delta=at,
            confidence=audit_confidence,
            claimed_epsilon=plan.epsilon_after(done, delta=at),
        )
    return TrainingResult(
        plan=plan,
        run_id=run,
        steps_done=done,
        epsilon=plan.epsilon_after(done),
        delta=plan.target_delta,
        history=tuple(history),
        final_accuracy=final,
        public_accuracy=public_accuracy,
        state_dict={k: v.detach().clone() for k, v in net.state_dict().items()},
        audit=report,
    )


def _check_audit(
    *,
    audit_canaries: int,
    audit_kind: str,
    audit_confidence: float,
    audit_delta: float | None,
    feature_shape: tuple[int, ...],
    num_classes: int,
    stop_after: int | None,
    checkpoint: Path | None,
) -> None:
    if (
        isinstance(audit_canaries, bool)
        or not isinstance(audit_canaries, int)
        or not 0 <= audit_canaries <= MAX_CANARIES
    ):
        raise ParameterError(
            "audit_canaries", audit_canaries, f"must be an int in [0, {MAX_CANARIES}]"
        )
    if audit_kind not in AUDIT_KINDS:
        raise ParameterError("audit_kind", audit_kind, f"must be one of {AUDIT_KINDS}")
    if not isinstance(audit_confidence, float | int) or not 0 < audit_confidence < 1:
        raise ParameterError("audit_confidence", audit_confidence, "must be in (0, 1)")
    if audit_delta is not None and (
        not isinstance(audit_delta, float | int) or not 0 < audit_delta < 1
    ):
        raise ParameterError("audit_delta", audit_delta, "must be in (0, 1)")
    if audit_canaries == 0:
        return
    if stop_after is not None:
        raise ParameterError("stop_after", stop_after, "an audit run is never stopped early")
    if checkpoint is not None and checkpoint.exists():
        raise ParameterError("checkpoint", str(checkpoint), "exists: an audit run is never resumed")
    if audit_kind == "black-box" and (not feature_shape or num_classes < 2):
        raise ParameterError(
            "feature_shape", feature_shape, "and num_classes >= 2 are needed for input canaries"
        )


def load_checkpoint(
    path: Path,
    *,
    python_path: str | Path | Sequence[str | Path] = (),
    model_options: Mapping[str, Any] | None = None,
    model_factory: Callable[[str], torch.nn.Module] = build_model,
) -> tuple[torch.nn.Module, TrainingPlan, int]:
    """(model with the checkpoint's parameters, its plan, steps done). A model named by
    import path is rebuilt from that factory (``python_path`` folders searched first), a
    built-in name with ``model_factory``."""
    state = _read_checkpoint(path)
    plan = _plan_from(state["plan"])
    net = model_factory_for(
        plan.model, default=model_factory, python_path=python_path, model_options=model_options
    )(plan.model)
    net.load_state_dict(state["model"])
    return net, plan, int(state["step"])


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, unpickled with torch's weights-only loader (tensors, numbers,
    strings and containers only: a file from elsewhere cannot run code)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ParameterError(
            "checkpoint",
            str(path),
            "is not a file of tensors and plain values (nothing else is unpickled)",
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ParameterError("checkpoint", str(path), f"cannot be read: {first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ParameterError("checkpoint", str(path), "is not an mpcdp checkpoint")
    return state


def _plan_from(obj: dict[str, Any]) -> TrainingPlan:
    return TrainingPlan(
        **{**obj, "parties": tuple(obj["parties"]), "examples": tuple(obj["examples"])}
    )


def write_metrics(
    result: TrainingResult, *, json_path: Path | None = None, plot_path: Path | None = None
) -> None:
    """The metrics JSON (``json_path``) and/or a PNG (``plot_path``, needs matplotlib): test
    accuracy (or loss) and epsilon against the epoch, with a legend, the target epsilon as
    a line, and both axes from 0."""
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if plot_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.step / result.plan.steps_per_epoch for r in result.history]
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    acc = [r.test_accuracy for r in result.history]
    lines = []
    if any(a is not None for a in acc):
        values = [a if a is not None else float("nan") for a in acc]
        lines += ax.plot(epochs, values, "o-", color="tab:blue", label="test accuracy")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
    else:
        loss = [r.test_loss if r.test_loss is not None else float("nan") for r in result.history]
        lines += ax.plot(epochs, loss, "o-", color="tab:blue", label="test loss")
        ax.set_ylabel("test loss")
        ax.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    ax.set_xlim(left=0)
    ax2 = ax.twinx()
    lines += ax2.plot(
        epochs, [r.epsilon for r in result.history], "s--", color="tab:red", label="epsilon spent"
    )
    lines.append(
        ax2.axhline(
            result.plan.target_epsilon, color="tab:red", linestyle=":", label="target epsilon"
        )
    )
    ax2.set_ylabel(f"epsilon (delta = {result.delta:g})")
    ax2.set_ylim(0, 1.1 * max(result.plan.target_epsilon, *(r.epsilon for r in result.history)))
    ax.legend(lines, [str(li.get_label()) for li in lines], loc="lower right")
    ax.set_title(f"{result.plan.model} on {len(result.plan.parties)} sites")
    fig.tight_layout()
    fig.savefig(plot_path)
    plt.close(fig)
