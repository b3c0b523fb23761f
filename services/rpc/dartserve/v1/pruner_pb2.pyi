from services.rpc.dartserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("prompt_ref", "pruning", "sampling", "image_hashes")
    PROMPT_REF_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HASHES_FIELD_NUMBER: _ClassVar[int]
    prompt_ref: str
    pruning: _common_pb2.Pruning
    sampling: _common_pb2.Sampling
    image_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_ref: _Optional[str] = ..., pruning: _Optional[_Union[_common_pb2.Pruning, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.Sampling, _Mapping]] = ..., image_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("kv_handle", "first_token", "first_text", "finish_reason", "prompt_tokens", "vision_tokens", "kept_vision_tokens", "kv_bytes", "prefill_ms", "selection_ms", "pruning_json", "kv_store_ms")
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_VISION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_MS_FIELD_NUMBER: _ClassVar[int]
    PRUNING_JSON_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_MS_FIELD_NUMBER: _ClassVar[int]
    kv_handle: str
    first_token: int
    first_text: str
    finish_reason: str
    prompt_tokens: int
    vision_tokens: int
    kept_vision_tokens: int
    kv_bytes: int
    prefill_ms: float
    selection_ms: float
    pruning_json: str
    kv_store_ms: float
    def __init__(self, kv_handle: _Optional[str] = ..., first_token: _Optional[int] = ..., first_text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., vision_tokens: _Optional[int] = ..., kept_vision_tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., prefill_ms: _Optional[float] = ..., selection_ms: _Optional[float] = ..., pruning_json: _Optional[str] = ..., kv_store_ms: _Optional[float] = ...) -> None: ...
