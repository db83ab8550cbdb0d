from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    ACCEPTED: _ClassVar[Outcome]
    DUPLICATE: _ClassVar[Outcome]
    REJECTED: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
ACCEPTED: Outcome
DUPLICATE: Outcome
REJECTED: Outcome

class UsageRecord(_message.Message):
    __slots__ = ("id", "host_id", "metric", "quantity", "unit", "start_us", "end_us", "seq", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    START_US_FIELD_NUMBER: _ClassVar[int]
    END_US_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    host_id: str
    metric: str
    quantity: str
    unit: str
    start_us: int
    end_us: int
    seq: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., host_id: _Optional[str] = ..., metric: _Optional[str] = ..., quantity: _Optional[str] = ..., unit: _Optional[str] = ..., start_us: _Optional[int] = ..., end_us: _Optional[int] = ..., seq: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("records", "agent_version", "sent_at_us", "backlog_records", "dead_letters", "seq_epoch", "seq_epoch_start", "retired_seqs", "columns")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_RECORDS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    SEQ_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_EPOCH_START_FIELD_NUMBER: _ClassVar[int]
    RETIRED_SEQS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    agent_version: str
    sent_at_us: int
    backlog_records: int
    dead_letters: int
    seq_epoch: str
    seq_epoch_start: int
    retired_seqs: _containers.RepeatedCompositeFieldContainer[SeqRange]
    columns: RecordColumns
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ..., agent_version: _Optional[str] = ..., sent_at_us: _Optional[int] = ..., backlog_records: _Optional[int] = ..., dead_letters: _Optional[int] = ..., seq_epoch: _Optional[str] = ..., seq_epoch_start: _Optional[int] = ..., retired_seqs: _Optional[_Iterable[_Union[SeqRange, _Mapping]]] = ..., columns: _Optional[_Union[RecordColumns, _Mapping]] = ...) -> None: ...

class RecordColumns(_message.Message):
    __slots__ = ("host_id", "ids", "series", "quantities", "start_us", "end_us", "seqs", "series_table")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    QUANTITIES_FIELD_NUMBER: _ClassVar[int]
    START_US_FIELD_NUMBER: _ClassVar[int]
    END_US_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    SERIES_TABLE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    series: _containers.RepeatedScalarFieldContainer[int]
    quantities: _containers.RepeatedScalarFieldContainer[str]
    start_us: _containers.RepeatedScalarFieldContainer[int]
    end_us: _containers.RepeatedScalarFieldContainer[int]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    series_table: _containers.RepeatedCompositeFieldContainer[Series]
    def __init__(self, host_id: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., series: _Optional[_Iterable[int]] = ..., quantities: _Optional[_Iterable[str]] = ..., start_us: _Optional[_Iterable[int]] = ..., end_us: _Optional[_Iterable[int]] = ..., seqs: _Optional[_Iterable[int]] = ..., series_table: _Optional[_Iterable[_Union[Series, _Mapping]]] = ...) -> None: ...

class Series(_message.Message):
    __slots__ = ("metric", "unit", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METRIC_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    metric: str
    unit: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, metric: _Optional[str] = ..., unit: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SeqRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class RecordAck(_message.Message):
    __slots__ = ("id", "outcome", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    outcome: Outcome
    reason: str
    def __init__(self, id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("acks", "clock_skew_us")
    ACKS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_US_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[RecordAck]
    clock_skew_us: int
    def __init__(self, acks: _Optional[_Iterable[_Union[RecordAck, _Mapping]]] = ..., clock_skew_us: _Optional[int] = ...) -> None: ...
