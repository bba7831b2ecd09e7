"""Conversions between protobuf messages (mpcdp/proto/party.proto) and protocol objects.

Decoding is strict: a wrong protocol version, a session id of the wrong size, a statistic the
spec does not know, a data chunk that is not a whole number of 8-byte words or a stream that
does not start with its header are refused with ProtocolError.

Every string, bytes and repeated field a party receives is capped before it is used (see
LIMITS: a request may not make a party echo or log megabytes): a longer one is refused with
a ProtocolError that names the field and its length, never its contents.

Upload stream: one ``ContributeChunk{header}``, then ``ContributeChunk{data}`` messages each
holding ``chunk_bytes`` (the last one fewer) of little-endian words, in order: uint64, or
uint32 for queries over Z_{2^32}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields

import numpy as np
from numpy.typing import NDArray

from mpcdp import PROTOCOL_VERSION
from mpcdp.errors import DecodeError, ParameterError, ProtocolError
from mpcdp.mpc import ring
from mpcdp.proto import party_pb2 as pb
from mpcdp.protocol.catalog import ColumnInfo, DatasetInfo, PartyDescription
from mpcdp.protocol.identity import BATCH_ID_BYTES, Prekey, SignedKey
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.round_coordinator import ContributionStream
from mpcdp.protocol.session import SESSION_ID_BYTES, Contribution, Proposal
from mpcdp.protocol.training import TrainSpec

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "LIMITS",
    "check_chunk_bytes",
    "check_reason",
    "check_version",
    "decode_chunks",
    "decode_step_requests",
    "description_from_pb",
    "description_to_pb",
    "encode_chunks",
    "encode_step_requests",
    "key_from_pb",
    "key_to_pb",
    "keys_from_pb",
    "prekey_from_pb",
    "prekey_to_pb",
    "prekeys_from_pb",
    "spec_from_pb",
    "spec_to_pb",
    "train_spec_from_pb",
    "train_spec_to_pb",
]

DEFAULT_CHUNK_BYTES = 4 << 20
MAX_CHUNK_BYTES = 8 << 20

#: Caps on the variable-length fields of requests (characters, bytes or entries).
LIMITS: dict[str, int] = {
    "query_id": 128,
    "dataset": 128,
    "column": 128,
    "mechanism": 32,
    "epsilon": 64,
    "parties": 64,  # entries; each a checked identity of <= 63 characters
    "party": 63,
    "categories": 1024,  # entries
    "category": 128,
    "run_id": 128,
    "model": 128,
    "clipping": 32,
    "reason": 512,
    "keys": 64,  # signed keys relayed in one request
    "public_key": 32,
    "signature": 128,
    "certificate": 8192,
    "audit_kind": 16,
    "loss": 128,
    "fingerprint": 64,
    "architecture": 1 << 14,  # entries (mpcdp.protocol.training.fingerprint.MAX_ENTRIES)
    "architecture_entry": 512,
    # bytes: the packed inclusion bits of at most mpcdp.audit.canaries.MAX_CANARIES canaries
    "audit_inclusion": 1 << 17,
    "sql": 1 << 16,
    "group_keys": 16,  # GROUP BY columns with a key list
    "key_values": 1 << 16,  # keys of one column
    "key": 256,
    "weights": 256,
    "plan_digest": 64,
    "model_options": 4096,  # mpcdp.protocol.training.train_spec.MAX_MODEL_OPTIONS
}


def _cap(name: str, value: str | bytes) -> None:
    if len(value) > LIMITS[name]:
        raise ProtocolError(
            f"{name} has {len(value)} {'bytes' if isinstance(value, bytes) else 'characters'}; "
            f"the limit is {LIMITS[name]}"
        )


def _cap_list(name: str, item: str, values: Sequence[str]) -> None:
    if len(values) > LIMITS[name]:
        raise ProtocolError(f"{name} has {len(values)} entries; the limit is {LIMITS[name]}")
    for v in values:
        _cap(item, v)


def check_reason(reason: str) -> str:
    """An Abort's reason, capped like every other string a party receives."""
    _cap("reason", reason)
    return reason


def check_chunk_bytes(chunk_bytes: int) -> int:
    """A requested upload chunk size (0: the default), checked before anything is charged."""
    if chunk_bytes == 0:
        return DEFAULT_CHUNK_BYTES
    if chunk_bytes < 0 or chunk_bytes % 8 or chunk_bytes > MAX_CHUNK_BYTES:
        raise ParameterError(
            "chunk_bytes", chunk_bytes, f"must be a positive multiple of 8, <= {MAX_CHUNK_BYTES}"
        )
    return chunk_bytes


_STAT_TO_PB = {
    Statistic.SUM: pb.SUM,
    Statistic.MEAN: pb.MEAN,
    Statistic.COUNT: pb.COUNT,
    Statistic.HISTOGRAM: pb.HISTOGRAM,
    Statistic.SQL: pb.SQL,
}
_STAT_FROM_PB = {v: k for k, v in _STAT_TO_PB.items()}


def check_version(version: int, *, what: str) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what}: protocol version {version} is not supported (this node speaks "
            f"{PROTOCOL_VERSION})"
        )


def check_session(session_id: bytes) -> bytes:
    if len(session_id) != SESSION_ID_BYTES:
        raise ProtocolError(f"session_id must be {SESSION_ID_BYTES} bytes, got {len(session_id)}")
    return session_id


def spec_to_pb(spec: QuerySpec) -> pb.QuerySpec:
    return pb.QuerySpec(
        query_id=spec.query_id,
        dataset=spec.dataset,
        column=spec.column,
        statistic=_STAT_TO_PB[spec.statistic],
        mechanism=spec.mechanism,
        epsilon=spec.epsilon,
        delta=spec.delta,
        frac_bits=spec.frac_bits,
        parties=list(spec.parties),
        colluders=spec.colluders,
        lower=spec.lower,
        upper=spec.upper,
        categories=list(spec.categories),
        max_rows=spec.max_rows,
        l2_bound=spec.l2_bound,
        ring_bits=spec.ring_bits,
        sql=spec.sql,
        keys=[pb.GroupKeys(column=c, values=list(v)) for c, v in spec.keys],
        bins=spec.bins,
        weights=list(spec.weights),
        max_parties_per_unit=spec.max_parties_per_unit,
        max_rows_per_unit=spec.max_rows_per_unit,
        max_groups_per_unit=spec.max_groups_per_unit,
        plan_digest=spec.plan_digest,
    )


def spec_from_pb(msg: pb.QuerySpec) -> QuerySpec:
    for name in ("query_id", "dataset", "column", "mechanism", "epsilon", "sql", "plan_digest"):
        _cap(name, getattr(msg, name))
    _cap_list("parties", "party", msg.parties)
    _cap_list("categories", "category", msg.categories)
    if len(msg.keys) > LIMITS["group_keys"]:
        raise ProtocolError(
            f"keys has {len(msg.keys)} columns; the limit is {LIMITS['group_keys']}"
        )
    for k in msg.keys:
        _cap("column", k.column)
        _cap_list("key_values", "key", k.values)
    if len(msg.weights) > LIMITS["weights"]:
        raise ProtocolError(
            f"weights has {len(msg.weights)} entries; the limit is {LIMITS['weights']}"
        )
    if msg.statistic not in _STAT_FROM_PB:
        raise ProtocolError(f"unknown statistic {msg.statistic}")
    try:
        return QuerySpec(
            query_id=msg.query_id,
            dataset=msg.dataset,
            column=msg.column,
            statistic=_STAT_FROM_PB[msg.statistic],
            mechanism=msg.mechanism,
            epsilon=msg.epsilon,
            delta=msg.delta,
            frac_bits=msg.frac_bits,
            parties=tuple(msg.parties),
            colluders=msg.colluders,
            lower=msg.lower,
            upper=msg.upper,
            categories=tuple(msg.categories),
            max_rows=msg.max_rows,
            l2_bound=msg.l2_bound,
            ring_bits=msg.ring_bits or 64,
            sql=msg.sql,
            keys=tuple((k.column, tuple(k.values)) for k in msg.keys),
            bins=msg.bins,
            weights=tuple(msg.weights),
            max_parties_per_unit=msg.max_parties_per_unit or 1,
            max_rows_per_unit=msg.max_rows_per_unit or 1,
            max_groups_per_unit=msg.max_groups_per_unit or 1,
            plan_digest=msg.plan_digest,
        )
    except ParameterError as exc:
        raise ProtocolError(f"invalid query: {exc}") from None


def key_to_pb(session_id: bytes, key: SignedKey, *, length: int = 0) -> pb.ProposeResponse:
    """A signed key as sent in ProposeResponse (and relayed unchanged in ContributeRequest)."""
    return pb.ProposeResponse(
        version=PROTOCOL_VERSION,
        session_id=session_id,
        party_id=key.party_id,
        public_key=key.public_key,
        signature=key.signature,
        certificate=key.certificate,
        length=length,
    )


def key_from_pb(msg: pb.ProposeResponse, *, session_id: bytes) -> Proposal:
    check_version(msg.version, what="ProposeResponse")
    _cap("party", msg.party_id)
    for name in ("public_key", "signature", "certificate"):
        _cap(name, getattr(msg, name))
    if msg.session_id != session_id:
        raise ProtocolError("ProposeResponse for another session")
    return Proposal(
        key=SignedKey(
            party_id=msg.party_id,
            public_key=msg.public_key,
            signature=msg.signature,
            certificate=msg.certificate,
        ),
        length=msg.length,
    )


def keys_from_pb(msgs: Sequence[pb.ProposeResponse], *, session_id: bytes) -> list[SignedKey]:
    """The signed keys relayed in a request (at most LIMITS["keys"])."""
    if len(msgs) > LIMITS["keys"]:
        raise ProtocolError(f"keys has {len(msgs)} entries; the limit is {LIMITS['keys']}")
    return [key_from_pb(k, session_id=session_id).key for k in msgs]


def prekey_to_pb(key: Prekey) -> pb.Prekey:
    """A pre-published key as a party publishes it (and a coordinator relays it)."""
    return pb.Prekey(
        party_id=key.party_id,
        coordinator=key.coordinator,
        batch_id=key.batch_id,
        index=key.index,
        expires=key.expires,
        public_key=key.public_key,
        signature=key.signature,
        certificate=key.certificate,
    )


def prekey_from_pb(msg: pb.Prekey) -> Prekey:
    """A pre-published key, its fields capped (the signature is checked by its user)."""
    _cap("party", msg.party_id)
    _cap("party", msg.coordinator)
    for name in ("public_key", "signature", "certificate"):
        _cap(name, getattr(msg, name))
    if len(msg.batch_id) != BATCH_ID_BYTES:
        raise ProtocolError(
            f"batch_id of a pre-published key has {len(msg.batch_id)} bytes, not {BATCH_ID_BYTES}"
        )
    return Prekey(
        party_id=msg.party_id,
        coordinator=msg.coordinator,
        batch_id=msg.batch_id,
        index=msg.index,
        expires=msg.expires,
        public_key=msg.public_key,
        signature=msg.signature,
        certificate=msg.certificate,
    )


def prekeys_from_pb(msgs: Sequence[pb.Prekey]) -> list[Prekey]:
    """The pre-published keys of a message (at most LIMITS["keys"])."""
    if len(msgs) > LIMITS["keys"]:
        raise ProtocolError(f"prekeys has {len(msgs)} entries; the limit is {LIMITS['keys']}")
    return [prekey_from_pb(k) for k in msgs]


def encode_chunks(
    session_id: bytes, contribution: Contribution, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.ContributeChunk]:
    """The upload stream: header, then ``chunk_bytes`` of words per message."""
    if chunk_bytes <= 0:
        raise ParameterError("chunk_bytes", chunk_bytes, "must be > 0")
    check_chunk_bytes(chunk_bytes)
    yield pb.ContributeChunk(
        version=PROTOCOL_VERSION,
        session_id=session_id,
        header=pb.ContributionHeader(
            party_id=contribution.party_id,
            length=contribution.length,
            epsilon_spent=contribution.epsilon_spent,
            budget_remaining=contribution.budget_remaining,
            audit_inclusion=contribution.audit_inclusion,
        ),
    )
    wire = ring.dtype_for(contribution.ring_bits)  # little-endian words
    for seg in contribution.chunks(chunk_bytes // wire.itemsize):
        yield pb.ContributeChunk(
            version=PROTOCOL_VERSION,
            session_id=session_id,
            data=seg.astype(wire, copy=False).tobytes(),
        )


def decode_chunks(
    messages: Iterable[pb.ContributeChunk], *, session_id: bytes, ring_bits: int = 64
) -> ContributionStream:
    """Strictly decode an upload stream; chunks are decoded lazily as they arrive."""
    it = iter(messages)
    try:
        first = next(it)
    except StopIteration:
        raise ProtocolError("empty contribution stream (no header)") from None
    check_version(first.version, what="ContributeChunk")
    if first.session_id != session_id:
        raise ProtocolError("contribution stream for another session")
    if first.WhichOneof("body") != "header":
        raise ProtocolError("contribution stream does not start with its header")
    h = first.header
    _cap("audit_inclusion", h.audit_inclusion)

    def chunks() -> Iterator[ring.RingVector]:
        for msg in it:
            check_version(msg.version, what="ContributeChunk")
            if msg.session_id != session_id:
                raise ProtocolError("contribution chunk for another session")
            if msg.WhichOneof("body") != "data":
                raise ProtocolError("a second header in the contribution stream")
            try:
                yield ring.from_bytes(msg.data, copy=False, bits=ring_bits)
            except DecodeError as exc:
                raise ProtocolError(f"malformed chunk from {h.party_id!r}: {exc}") from None

    return ContributionStream(
        party_id=h.party_id,
        length=h.length,
        epsilon_spent=h.epsilon_spent,
        budget_remaining=h.budget_remaining,
        chunks=chunks(),
        audit_inclusion=h.audit_inclusion,
    )


# -- training (TrainOpen / TrainStep) -----------------------------------------------------------
#
# TrainStep request stream: one TrainStepRequest{header}, then TrainStepRequest{parameters}
# messages of at most MAX_CHUNK_BYTES of little-endian float32 values, in order, adding up to
# exactly header.parameter_count values. The answer is an upload stream as above.

_TRAIN_FIELDS = (
    "run_id",
    "dataset",
    "model",
    "sample_rate",
    "steps",
    "start_step",
    "steps_per_charge",
    "max_grad_norm",
    "clipping",
    "bias_only",
    "scale_bits",
    "mu",
    "num_params",
    "ring_bits",
    "colluders",
    "audit_canaries",
    "audit_kind",
    "loss",
    "fingerprint",
    "model_options",
    "eval_every",
    "eval_mu",
    "eval_loss_bound",
)


def train_spec_to_pb(spec: TrainSpec) -> pb.TrainSpec:
    msg = pb.TrainSpec(parties=list(spec.parties), architecture=list(spec.architecture))
    for name in _TRAIN_FIELDS:
        setattr(msg, name, getattr(spec, name))
    return msg


def train_spec_from_pb(msg: pb.TrainSpec) -> TrainSpec:
    for name in (
        "run_id",
        "dataset",
        "model",
        "clipping",
        "audit_kind",
        "loss",
        "fingerprint",
        "model_options",
    ):
        _cap(name, getattr(msg, name))
    _cap_list("parties", "party", msg.parties)
    _cap_list("architecture", "architecture_entry", msg.architecture)
    try:
        return TrainSpec(
            parties=tuple(msg.parties),
            architecture=tuple(msg.architecture),
            **{n: getattr(msg, n) for n in _TRAIN_FIELDS if n != "loss"},
            loss=msg.loss or "cross_entropy",  # proto3: unset is ""
        )
    except ParameterError as exc:
        raise ProtocolError(f"invalid training spec: {exc}") from None


def encode_step_requests(
    *,
    session_id: bytes,
    step: int,
    keys: Iterable[SignedKey],
    parameters: NDArray[np.float32],
    full: bool,
    chunk_bytes: int = 0,
    evaluate: bool = False,
) -> Iterator[pb.TrainStepRequest]:
    """Header, then the parameters in chunks (see above); ``evaluate``: an evaluation at the
    sites before step ``step`` instead of the step."""
    values = np.ascontiguousarray(parameters, dtype="<f4").reshape(-1)
    yield pb.TrainStepRequest(
        version=PROTOCOL_VERSION,
        session_id=session_id,
        header=pb.TrainStepHeader(
            step=step,
            keys=[key_to_pb(session_id, k) for k in keys],
            full=full,
            parameter_count=values.size,
            chunk_bytes=chunk_bytes,
            evaluate=evaluate,
        ),
    )
    per = DEFAULT_CHUNK_BYTES // 4
    for start in range(0, values.size, per):
        yield pb.TrainStepRequest(
            version=PROTOCOL_VERSION,
            session_id=session_id,
            parameters=values[start : start + per].tobytes(),
        )


def decode_step_requests(
    messages: Iterable[pb.TrainStepRequest], *, max_values: Callable[[bytes], int]
) -> tuple[bytes, pb.TrainStepHeader, list[SignedKey], NDArray[np.float32]]:
    """Strictly decode a TrainStep request stream: (session id, header, keys, parameters)."""
    it = iter(messages)
    try:
        first = next(it)
    except StopIteration:
        raise ProtocolError("empty TrainStep stream (no header)") from None
    check_version(first.version, what="TrainStepRequest")
    session_id = check_session(first.session_id)
    if first.WhichOneof("body") != "header":
        raise ProtocolError("TrainStep stream does not start with its header")
    h = first.header
    limit = max_values(session_id)  # also refuses an unknown session before any payload
    if h.parameter_count > limit:
        raise ProtocolError(f"parameter_count={h.parameter_count} exceeds this session's {limit}")
    values = np.empty(h.parameter_count, dtype=np.float32)
    offset = 0
    for msg in it:
        check_version(msg.version, what="TrainStepRequest")
        if msg.session_id != session_id:
            raise ProtocolError("TrainStep chunk for another session")
        if msg.WhichOneof("body") != "parameters":
            raise ProtocolError("a second header in the TrainStep stream")
        data = msg.parameters
        if len(data) % 4:
            raise ProtocolError(f"parameters chunk of {len(data)} bytes is not whole float32s")
        n = len(data) // 4
        if offset + n > values.size:
            raise ProtocolError(f"more than parameter_count={h.parameter_count} values")
        values[offset : offset + n] = np.frombuffer(data, dtype="<f4")
        offset += n
    if offset != values.size:
        raise ProtocolError(f"{offset} of parameter_count={h.parameter_count} values arrived")
    return session_id, h, keys_from_pb(h.keys, session_id=session_id), values


# -- Describe: the datasets' public metadata ----------------------------------------------------


def _dataset_to_pb(info: DatasetInfo) -> pb.DatasetInfo:
    values = {f.name: getattr(info, f.name) for f in fields(info)}
    values["columns"] = [
        pb.ColumnInfo(
            name=c.name,
            lower=c.lower,
            upper=c.upper,
            categories=list(c.categories),
            edges=list(c.edges),
        )
        for c in info.columns
    ]
    values["feature_shape"] = list(info.feature_shape)
    return pb.DatasetInfo(**values)


def _dataset_from_pb(msg: pb.DatasetInfo) -> DatasetInfo:
    return DatasetInfo(
        name=msg.name,
        kind=msg.kind,
        columns=tuple(
            ColumnInfo(
                name=c.name,
                lower=c.lower,
                upper=c.upper,
                categories=tuple(c.categories),
                edges=tuple(c.edges),
            )
            for c in msg.columns
        ),
        length=int(msg.length),
        l2_bound=msg.l2_bound,
        budget_epsilon=msg.budget_epsilon,
        remaining_epsilon=msg.remaining_epsilon,
        delta=msg.delta,
        allow_exact=msg.allow_exact,
        feature_shape=tuple(int(n) for n in msg.feature_shape),
        num_classes=int(msg.num_classes),
        coordinator_share=msg.coordinator_share,
        coordinator_remaining_epsilon=msg.coordinator_remaining_epsilon,
        privacy_unit=msg.privacy_unit,
        max_rows_per_unit=int(msg.max_rows_per_unit) or 1,
        max_groups_per_unit=int(msg.max_groups_per_unit) or 1,
        max_parties_per_unit=int(msg.max_parties_per_unit) or 1,
        held_out=int(msg.held_out),
    )


def description_to_pb(description: PartyDescription) -> pb.DescribeResponse:
    """A party's Describe answer on the wire (with this protocol version)."""
    return pb.DescribeResponse(
        version=PROTOCOL_VERSION,
        party_id=description.party_id,
        datasets=[_dataset_to_pb(d) for d in description.datasets],
    )


def description_from_pb(msg: pb.DescribeResponse) -> PartyDescription:
    """A party's Describe answer as the analyst reads it (the version is checked)."""
    check_version(msg.version, what="DescribeResponse")
    return PartyDescription(
        party_id=msg.party_id, datasets=tuple(_dataset_from_pb(d) for d in msg.datasets)
    )
