from services.rpc.dartserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("kv_handle", "sampling", "pending_token", "question")
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    kv_handle: str
    sampling: _common_pb2.Sampling
    pending_token: int
    question: str
    def __init__(self, kv_handle: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.Sampling, _Mapping]] = ..., pending_token: _Optional[int] = ..., question: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text", "done", "kv_handle", "pending_token", "finish_reason", "prefill_tokens", "decode_ms", "prefill_ms", "kv_store_ms")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_MS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    done: bool
    kv_handle: str
    pending_token: int
    finish_reason: str
    prefill_tokens: int
    decode_ms: float
    prefill_ms: float
    kv_store_ms: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., kv_handle: _Optional[str] = ..., pending_token: _Optional[int] = ..., finish_reason: _Optional[str] = ..., prefill_tokens: _Optional[int] = ..., decode_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., kv_store_ms: _Optional[float] = ...) -> None: ...
