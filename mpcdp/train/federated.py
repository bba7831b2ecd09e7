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

import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch.utils.data import Dataset

from mpcdp.errors import ParameterError
from mpcdp.mpc import ring
from mpcdp.protocol.training import TrainingClient, TrainSpec
from mpcdp.protocol.training.roster import RosterChange, TrainingRoster
from mpcdp.protocol.training.train_spec import encode_model_options
from mpcdp.train.audit_run import (
    UntestableAuditError,
    black_box_scores,
    check_audit_options,
    finish,
    preflight,
    white_box_scorer,
)
from mpcdp.train.clipping import ClippingMode, PerSampleClipper
from mpcdp.train.eval_data import checked_eval_data, evaluate
from mpcdp.train.models import build_model
from mpcdp.train.planning import TrainingPlan, plan_training
from mpcdp.train.results import (
    CHECKPOINT_FORMAT,
    EpochRecord,
    StepInfo,
    TrainingResult,
    held_out_counts,
    load_checkpoint,
    plan_from,
    read_checkpoint,
    record_from,
    save_checkpoint,
    site_evaluation_fields,
    write_metrics,
)
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
    "UntestableAuditError",
    "checked_eval_data",
    "evaluate",
    "load_checkpoint",
    "plan_training",
    "set_flat_gradients",
    "train",
    "write_metrics",
]

log = logging.getLogger(__name__)


Arrays = tuple[NDArray[Any], NDArray[Any]]


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
    x = _features(data[0])
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


def _features(x: NDArray[Any]) -> torch.Tensor:
    """Features as the model takes them: integer ones (token ids) stay int64, the others
    become float32 (checked_eval_data has chosen which the model runs on)."""
    a = np.asarray(x)
    return torch.as_tensor(a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(np.float32))


def _make_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ParameterError("optimizer", name, "must be 'sgd' or 'adam'")


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
    clipping: ClippingMode = "flat",
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
    allow_untestable: bool = False,
    min_parties: int | None = None,
    step_deadline_s: float | None = None,
    rejoin_interval_s: float = 10.0,
    max_pause_s: float = 300.0,
    on_roster_change: Callable[[RosterChange], None] | None = None,
    site_eval_every: int = 0,
    site_eval_epsilon: float | None = None,
    site_eval_loss_bound: float = 4.0,
    held_out: Mapping[str, int] | None = None,
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

    With ``audit_canaries`` > 0 the run is a one-run audit (mpcdp.train.audit_run): each site
    takes that many canaries of ``audit_kind``, the result's ``audit`` holds the bound at
    ``audit_confidence`` for ``audit_delta`` (default target_delta) next to the accountant's
    epsilon at that delta. An audit run is one session: it is never resumed from a
    checkpoint, and ``stop_after`` is refused. Black-box canaries need the sites'
    ``feature_shape`` and ``num_classes`` (Describe; Federation.train fills them in).
    Before any site is asked, the audit's ceiling (the bound if every guess were right) is
    compared with the claim (:func:`mpcdp.train.audit_run.preflight`): a claimed epsilon at or
    above it cannot be refuted by any outcome, and the run is refused with
    :class:`UntestableAuditError` (a ParameterError naming ``audit_canaries``, with the
    canaries or audited delta that would make it testable), charging nothing, unless
    ``allow_untestable`` (as ``mpcdp audit --allow-untestable``).

    When a site fails or misses ``step_deadline_s`` (default: its client's deadline), the
    step is re-run among the others in a new session (fresh keys and masks, noise shares
    sized for the smaller roster) as long as ``min_parties`` sites (default: all) remain
    with an honest one among them; the site is asked again every ``rejoin_interval_s`` and
    rejoins with the current model; below ``min_parties`` the run pauses up to
    ``max_pause_s``, then raises RosterExhausted (the checkpoint, when given, keeps every
    step done). ``on_roster_change`` is told of each change. Each site's epsilon counts the
    steps it took part in (mpcdp.protocol.training.roster); the result and each epoch record
    hold them. An audit run tolerates no failure (its canaries need one session).

    With ``site_eval_every`` epochs, the sites evaluate the model on their own held-out
    splits after every that many epochs and after the last (mpcdp.protocol.training
    .evaluation): the noisy totals of all sites that take part (accuracy for cross-entropy,
    the mean loss clipped to ``site_eval_loss_bound``, the number of examples) land in the
    epoch records. The evaluations spend at most ``site_eval_epsilon`` (default a tenth of
    the target) and the steps the rest (:func:`plan_training`). ``held_out`` maps each site
    to the examples of its held-out split (public, from Describe; Federation.train fills it
    in): the noisy sums are divided by the exact total of the sites that took part. An
    evaluation that a site fails is skipped, not re-run.
    """
    parties = tuple(examples)
    check_audit_options(
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
        site_eval_every=site_eval_every,
        site_eval_epsilon=site_eval_epsilon,
        site_eval_loss_bound=site_eval_loss_bound,
        loss=loss,
    )
    if plan.eval_every:
        held_out = held_out_counts(held_out, parties)
    if audit_canaries and not allow_untestable:  # before any site is asked or charged
        check = preflight(plan=plan, delta=audit_delta, confidence=audit_confidence)
        if not check.testable:
            raise UntestableAuditError(check)
    opt = _make_optimizer(optimizer, trainable, learning_rate, momentum)
    history: list[EpochRecord] = []
    start = 0
    state: dict[str, Any] | None = None
    public_accuracy: float | None = None
    if eval_data is not None:  # a bad file fails now, before any site is asked or charged
        eval_data = checked_eval_data(
            net, eval_data, loss=loss, python_path=python_path, feature_shape=feature_shape
        )
    if public_data is not None:  # checked the same way, before the warm start
        checked = checked_eval_data(
            net, public_data, loss=loss, python_path=python_path, name="public_data"
        )
        assert isinstance(checked, tuple)  # arrays in, arrays out
        public_data = checked
    if metric:  # a bad path or value fails now, before any site is asked or charged
        if eval_data is None:
            raise ParameterError("metric", metric, "needs eval_data to be computed on")
        evaluate_metric(net, eval_data, metric=metric, python_path=python_path)
    run = run_id or f"train-{secrets.token_hex(6)}"
    if checkpoint is not None and checkpoint.exists():
        state = read_checkpoint(checkpoint)
        saved = plan_from(state["plan"])
        if saved != plan:
            diff = [k for k in asdict(plan) if asdict(plan)[k] != asdict(saved)[k]]
            raise ParameterError(
                "checkpoint", str(checkpoint), f"was made with a different plan (differs in {diff})"
            )
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        history = [record_from(r) for r in state["history"]]
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
            _features(public_data[0]),
            torch.as_tensor(np.asarray(public_data[1], dtype=np.int64)),
        )
    end = plan.steps if stop_after is None else min(plan.steps, start + stop_after)
    t0 = time.perf_counter()
    revealed: dict[str, NDArray[np.bool_]] = {}
    scorer = None
    spec = replace(
        with_declared_model(
            plan.spec(run_id=run, start_step=start, steps=max(plan.steps - start, 1)),
            factory=model_factory,
            loss=loss,
        ),
        # the sites check each option against what their party.toml lets a coordinator set
        model_options=encode_model_options(model_options),
    )
    if plan.audit_kind == "white-box" and start < end:
        scorer = white_box_scorer(spec=spec)
    examples_of = dict(zip(plan.parties, plan.examples, strict=True))

    def spec_for(roster: tuple[str, ...], first: int) -> TrainSpec:
        return replace(spec, parties=roster, start_step=first, steps=plan.steps - first)

    roster = TrainingRoster(
        spec_for=spec_for,
        clients=clients,
        min_parties=len(parties) if min_parties is None else min_parties,
        colluders=plan.colluders,
        tolerate=plan.audit_canaries == 0,  # an audit run's canaries need one session
        step_deadline_s=step_deadline_s,
        rejoin_interval_s=rejoin_interval_s,
        max_pause_s=max_pause_s,
        on_change=on_roster_change,
    )
    counts = state.get("sites", {}) if state else {}
    for p in parties:  # a resumed run goes on counting each site's steps
        roster.uploads[p] += int(counts.get("uploads", {}).get(p, 0))
        roster.contributed[p] += int(counts.get("contributed", {}).get(p, 0))
        roster.eval_uploads[p] += int(counts.get("eval_uploads", {}).get(p, 0))
    changes: list[RosterChange] = [
        RosterChange(**c) for c in (counts.get("changes", []) if counts else [])
    ]
    epoch_start = dict(roster.contributed)

    def site_epsilon() -> dict[str, float]:
        return {
            p: plan.epsilon_after(roster.uploads[p], evaluations=roster.eval_uploads[p])
            for p in parties
        }

    def save(done: int) -> None:
        if checkpoint is None:
            return
        save_checkpoint(
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
                "sites": {
                    "uploads": dict(roster.uploads),
                    "contributed": dict(roster.contributed),
                    "eval_uploads": dict(roster.eval_uploads),
                    "changes": [asdict(c) for c in [*changes, *roster.changes]],
                },
            },
        )

    done = start
    if start < end:
        try:
            # one buffer each for the parameters sent (float32 on the wire: cat casts into
            # it), the summed words and the gradient (a fresh 10^7-vector per step costs more
            # in page faults than the pass over it)
            n = sum(p.numel() for p in trainable)
            sent = torch.empty(n, dtype=torch.float32)
            words = np.empty(n, dtype=ring.dtype_for(plan.ring_bits))
            grad = torch.empty(n, dtype=torch.float32)

            def parameters(full: bool) -> NDArray[np.float32]:
                if full:  # a session's first step carries every parameter, frozen ones too
                    flat = torch.nn.utils.parameters_to_vector(everything).detach()
                else:
                    flat = torch.cat([p.detach().reshape(-1) for p in trainable], out=sent)
                return flat.numpy()

            for step in range(start, end):
                outcome = roster.step(step, parameters=parameters, out=words)
                total = outcome.total
                if scorer is not None:
                    scorer.update(total)
                # integer units -> the averaged gradient, in one float32 pass (float32 rounds
                # each value by at most 2^-24 relative: post-processing of the release); the
                # expected batch is that of the sites this step ran over
                batch = plan.sample_rate * sum(examples_of[p] for p in outcome.parties)
                scale = 1.0 / (2.0**plan.scale_bits * batch)
                set_flat_gradients(trainable, grad.copy_(torch.from_numpy(total)).mul_(scale))
                if mix is not None:
                    pick = torch.randint(
                        0, len(mix[1]), (min(public_batch_size, len(mix[1])),), generator=gen
                    )
                    public_loss = F.cross_entropy(net(mix[0][pick]), mix[1][pick])
                    for w, g in zip(
                        trainable, torch.autograd.grad(public_loss, trainable), strict=True
                    ):
                        assert w.grad is not None
                        w.grad.add_(g, alpha=public_mixing)
                opt.step()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                at_sites = None
                if plan.eval_every:  # the session's spec says where (None elsewhere)
                    at_sites = roster.evaluate(done, parameters=parameters)
                if on_step is not None:
                    on_step(
                        StepInfo(
                            step=done,
                            steps=plan.steps,
                            epsilon=max(site_epsilon().values()),
                            seconds=time.perf_counter() - t0,
                        )
                    )
                if done % plan.steps_per_epoch == 0 or done == plan.steps or done == end:
                    acc, test_loss = (
                        evaluate_any(net, eval_data, loss=loss, python_path=python_path)
                        if eval_data is not None
                        else (None, None)
                    )
                    per_site = site_epsilon()
                    rec = EpochRecord(
                        epoch=math.ceil(done / plan.steps_per_epoch),
                        step=done,
                        epsilon=max(per_site.values()),
                        test_accuracy=acc,
                        test_loss=test_loss,
                        seconds=time.perf_counter() - t0,
                        test_metric=(
                            evaluate_metric(net, eval_data, metric=metric, python_path=python_path)
                            if metric and eval_data is not None
                            else None
                        ),
                        participation={p: roster.contributed[p] - epoch_start[p] for p in parties},
                        site_epsilon=per_site,
                        **site_evaluation_fields(at_sites, plan=plan, loss=loss, held_out=held_out),
                    )
                    if history and history[-1].step == done:
                        history[-1] = rec
                    else:
                        history.append(rec)
                        epoch_start = dict(roster.contributed)
                    save(done)  # saved before it is reported
                    if on_epoch is not None:
                        on_epoch(rec)
                elif outcome.new_session and start < done < end:
                    # the sites charged a new block with this step (a new roster): what they
                    # paid for is kept should the coordinator stop before the epoch ends
                    save(done)
            revealed = roster.audit_inclusion
        except BaseException:
            # stopped (too few sites, a refusal, Ctrl-C, an error): what the sites paid for
            # is kept, with each site's count of steps, and rerunning resumes here
            if done > start:
                save(done)
            raise
        finally:
            roster.close()
    done = max(start, done)
    final = None
    if history:  # the coordinator's test data, else the sites' held-out splits
        last = history[-1]
        final = last.test_accuracy if last.test_accuracy is not None else last.site_accuracy
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
    per_site = site_epsilon()
    return TrainingResult(
        plan=plan,
        run_id=run,
        steps_done=done,
        epsilon=max(per_site.values()),
        delta=plan.target_delta,
        history=tuple(history),
        final_accuracy=final,
        public_accuracy=public_accuracy,
        state_dict={k: v.detach().clone() for k, v in net.state_dict().items()},
        audit=report,
        participation=dict(roster.contributed),
        site_epsilon=per_site,
        steps_charged=dict(roster.uploads),
        roster_changes=(*changes, *roster.changes),
        evaluations_charged=dict(roster.eval_uploads),
    )
