from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Statistic(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATISTIC_UNSPECIFIED: _ClassVar[Statistic]
    SUM: _ClassVar[Statistic]
    MEAN: _ClassVar[Statistic]
    COUNT: _ClassVar[Statistic]
    HISTOGRAM: _ClassVar[Statistic]
STATISTIC_UNSPECIFIED: Statistic
SUM: Statistic
MEAN: Statistic
COUNT: Statistic
HISTOGRAM: Statistic

class QuerySpec(_message.Message):
    __slots__ = ("query_id", "dataset", "column", "statistic", "mechanism", "epsilon", "delta", "frac_bits", "parties", "colluders", "lower", "upper", "categories", "max_rows", "l2_bound", "ring_bits")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    COLLUDERS_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    L2_BOUND_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    dataset: str
    column: str
    statistic: Statistic
    mechanism: str
    epsilon: str
    delta: float
    frac_bits: int
    parties: _containers.RepeatedScalarFieldContainer[str]
    colluders: int
    lower: float
    upper: float
    categories: _containers.RepeatedScalarFieldContainer[str]
    max_rows: int
    l2_bound: float
    ring_bits: int
    def __init__(self, query_id: _Optional[str] = ..., dataset: _Optional[str] = ..., column: _Optional[str] = ..., statistic: _Optional[_Union[Statistic, str]] = ..., mechanism: _Optional[str] = ..., epsilon: _Optional[str] = ..., delta: _Optional[float] = ..., frac_bits: _Optional[int] = ..., parties: _Optional[_Iterable[str]] = ..., colluders: _Optional[int] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., categories: _Optional[_Iterable[str]] = ..., max_rows: _Optional[int] = ..., l2_bound: _Optional[float] = ..., ring_bits: _Optional[int] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("version", "session_id", "spec")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: bytes
    spec: QuerySpec
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., spec: _Optional[_Union[QuerySpec, _Mapping]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("version", "session_id", "party_id", "public_key", "signature", "certificate", "length")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: bytes
    party_id: str
    public_key: bytes
    signature: bytes
    certificate: bytes
    length: int
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., party_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., length: _Optional[int] = ...) -> None: ...

class ContributeRequest(_message.Message):
    __slots__ = ("version", "session_id", "keys", "chunk_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: bytes
    keys: _containers.RepeatedCompositeFieldContainer[ProposeResponse]
    chunk_bytes: int
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[_Union[ProposeResponse, _Mapping]]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ContributionHeader(_message.Message):
    __slots__ = ("party_id", "length", "epsilon_spent", "budget_remaining", "audit_inclusion")
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_REMAINING_FIELD_NUMBER: _ClassVar[int]
    AUDIT_INCLUSION_FIELD_NUMBER: _ClassVar[int]
    party_id: str
    length: int
    epsilon_spent: str
    budget_remaining: float
    audit_inclusion: bytes
    def __init__(self, party_id: _Optional[str] = ..., length: _Optional[int] = ..., epsilon_spent: _Optional[str] = ..., budget_remaining: _Optional[float] = ..., audit_inclusion: _Optional[bytes] = ...) -> None: ...

class ContributeChunk(_message.Message):
    __slots__ = ("version", "session_id", "header", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: bytes
    header: ContributionHeader
    data: bytes
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., header: _Optional[_Union[ContributionHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ColumnInfo(_message.Message):
    __slots__ = ("name", "lower", "upper", "categories")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    lower: float
    upper: float
    categories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., categories: _Optional[_Iterable[str]] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "kind", "columns", "length", "l2_bound", "budget_epsilon", "remaining_epsilon", "delta", "allow_exact", "feature_shape", "num_classes", "coordinator_share", "coordinator_remaining_epsilon")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    L2_BOUND_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EXACT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_SHARE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_REMAINING_EPSILON_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    columns: _containers.RepeatedCompositeFieldContainer[ColumnInfo]
    length: int
    l2_bound: float
    budget_epsilon: float
    remaining_epsilon: float
    delta: float
    allow_exact: bool
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    coordinator_share: float
    coordinator_remaining_epsilon: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[ColumnInfo, _Mapping]]] = ..., length: _Optional[int] = ..., l2_bound: _Optional[float] = ..., budget_epsilon: _Optional[float] = ..., remaining_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., allow_exact: _Optional[bool] = ..., feature_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., coordinator_share: _Optional[float] = ..., coordinator_remaining_epsilon: _Optional[float] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("version", "party_id", "datasets")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    version: int
    party_id: str
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, version: _Optional[int] = ..., party_id: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("version", "session_id", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: bytes
    reason: str
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("run_id", "dataset", "model", "parties", "colluders", "sample_rate", "steps", "start_step", "steps_per_charge", "max_grad_norm", "clipping", "bias_only", "scale_bits", "mu", "num_params", "ring_bits", "audit_canaries", "audit_kind", "loss", "architecture", "fingerprint")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    COLLUDERS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_CHARGE_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIPPING_FIELD_NUMBER: _ClassVar[int]
    BIAS_ONLY_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_CANARIES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_KIND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    dataset: str
    model: str
    parties: _containers.RepeatedScalarFieldContainer[str]
    colluders: int
    sample_rate: float
    steps: int
    start_step: int
    steps_per_charge: int
    max_grad_norm: float
    clipping: str
    bias_only: bool
    scale_bits: int
    mu: float
    num_params: int
    ring_bits: int
    audit_canaries: int
    audit_kind: str
    loss: str
    architecture: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: str
    def __init__(self, run_id: _Optional[str] = ..., dataset: _Optional[str] = ..., model: _Optional[str] = ..., parties: _Optional[_Iterable[str]] = ..., colluders: _Optional[int] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., start_step: _Optional[int] = ..., steps_per_charge: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., clipping: _Optional[str] = ..., bias_only: _Optional[bool] = ..., scale_bits: _Optional[int] = ..., mu: _Optional[float] = ..., num_params: _Optional[int] = ..., ring_bits: _Optional[int] = ..., audit_canaries: _Optional[int] = ..., audit_kind: _Optional[str] = ..., loss: _Optional[str] = ..., architecture: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class TrainOpenRequest(_message.Message):
    __slots__ = ("version", "session_id", "spec")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: bytes
    spec: TrainSpec
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., spec: _Optional[_Union[TrainSpec, _Mapping]] = ...) -> None: ...

class TrainStepHeader(_message.Message):
    __slots__ = ("step", "keys", "full", "parameter_count", "chunk_bytes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    keys: _containers.RepeatedCompositeFieldContainer[ProposeResponse]
    full: bool
    parameter_count: int
    chunk_bytes: int
    def __init__(self, step: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[ProposeResponse, _Mapping]]] = ..., full: _Optional[bool] = ..., parameter_count: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("version", "session_id", "header", "parameters")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: bytes
    header: TrainStepHeader
    parameters: bytes
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., header: _Optional[_Union[TrainStepHeader, _Mapping]] = ..., parameters: _Optional[bytes] = ...) -> None: ...
