from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Turn(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("images", "conversation", "cache_scope")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    conversation: _containers.RepeatedCompositeFieldContainer[Turn]
    cache_scope: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., conversation: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., cache_scope: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("prompt_ref", "image_hashes", "prompt_tokens", "vision_tokens", "images_cached", "encode_ms")
    PROMPT_REF_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HASHES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_CACHED_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    prompt_ref: str
    image_hashes: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: int
    vision_tokens: int
    images_cached: int
    encode_ms: float
    def __init__(self, prompt_ref: _Optional[str] = ..., image_hashes: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[int] = ..., vision_tokens: _Optional[int] = ..., images_cached: _Optional[int] = ..., encode_ms: _Optional[float] = ...) -> None: ...
