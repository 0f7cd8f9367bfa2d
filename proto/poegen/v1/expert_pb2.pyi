from poegen.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERT_KIND_UNSPECIFIED: _ClassVar[ExpertKind]
    EXPERT_KIND_GENERATIVE: _ClassVar[ExpertKind]
    EXPERT_KIND_DISCRIMINATIVE: _ClassVar[ExpertKind]
    EXPERT_KIND_CONSTRAINT: _ClassVar[ExpertKind]

class Capability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPABILITY_UNSPECIFIED: _ClassVar[Capability]
    CAPABILITY_SCORE: _ClassVar[Capability]
    CAPABILITY_LOG_PROB: _ClassVar[Capability]
    CAPABILITY_PROPOSE: _ClassVar[Capability]
    CAPABILITY_PROJECT: _ClassVar[Capability]
    CAPABILITY_AUTOENCODER: _ClassVar[Capability]
    CAPABILITY_SCHEDULE: _ClassVar[Capability]
    CAPABILITY_RENDER: _ClassVar[Capability]
    CAPABILITY_VJP: _ClassVar[Capability]

class ProposeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPOSE_MODE_UNSPECIFIED: _ClassVar[ProposeMode]
    PROPOSE_MODE_PROPOSE: _ClassVar[ProposeMode]
    PROPOSE_MODE_PROJECT: _ClassVar[ProposeMode]

class LoadStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_STAGE_UNSPECIFIED: _ClassVar[LoadStage]
    LOAD_STAGE_QUEUED: _ClassVar[LoadStage]
    LOAD_STAGE_LOADING: _ClassVar[LoadStage]
    LOAD_STAGE_READY: _ClassVar[LoadStage]
EXPERT_KIND_UNSPECIFIED: ExpertKind
EXPERT_KIND_GENERATIVE: ExpertKind
EXPERT_KIND_DISCRIMINATIVE: ExpertKind
EXPERT_KIND_CONSTRAINT: ExpertKind
CAPABILITY_UNSPECIFIED: Capability
CAPABILITY_SCORE: Capability
CAPABILITY_LOG_PROB: Capability
CAPABILITY_PROPOSE: Capability
CAPABILITY_PROJECT: Capability
CAPABILITY_AUTOENCODER: Capability
CAPABILITY_SCHEDULE: Capability
CAPABILITY_RENDER: Capability
CAPABILITY_VJP: Capability
PROPOSE_MODE_UNSPECIFIED: ProposeMode
PROPOSE_MODE_PROPOSE: ProposeMode
PROPOSE_MODE_PROJECT: ProposeMode
LOAD_STAGE_UNSPECIFIED: LoadStage
LOAD_STAGE_QUEUED: LoadStage
LOAD_STAGE_LOADING: LoadStage
LOAD_STAGE_READY: LoadStage

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("name", "kind", "capabilities", "sample_shape", "max_batch", "model_id", "revision", "latent_space", "max_message_bytes", "shared_memory", "pixel_input", "latent_layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LATENT_SPACE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PIXEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    LATENT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ExpertKind
    capabilities: _containers.RepeatedScalarFieldContainer[Capability]
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    max_batch: int
    model_id: str
    revision: str
    latent_space: str
    max_message_bytes: int
    shared_memory: bool
    pixel_input: bool
    latent_layout: LatentLayout
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ExpertKind, str]] = ..., capabilities: _Optional[_Iterable[_Union[Capability, str]]] = ..., sample_shape: _Optional[_Iterable[int]] = ..., max_batch: _Optional[int] = ..., model_id: _Optional[str] = ..., revision: _Optional[str] = ..., latent_space: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., pixel_input: _Optional[bool] = ..., latent_layout: _Optional[_Union[LatentLayout, _Mapping]] = ...) -> None: ...

class LatentLayout(_message.Message):
    __slots__ = ("channels", "packing", "spatial_compression", "temporal_compression", "multiple", "shift", "dynamic_shift")
    class DynamicShiftEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_SHIFT_FIELD_NUMBER: _ClassVar[int]
    channels: int
    packing: str
    spatial_compression: int
    temporal_compression: int
    multiple: int
    shift: float
    dynamic_shift: _containers.ScalarMap[str, float]
    def __init__(self, channels: _Optional[int] = ..., packing: _Optional[str] = ..., spatial_compression: _Optional[int] = ..., temporal_compression: _Optional[int] = ..., multiple: _Optional[int] = ..., shift: _Optional[float] = ..., dynamic_shift: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("text", "tensors", "scalars", "negative_text")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    scalars: _containers.ScalarMap[str, float]
    negative_text: str
    def __init__(self, text: _Optional[str] = ..., tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., scalars: _Optional[_Mapping[str, float]] = ..., negative_text: _Optional[str] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("condition",)
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    condition: Condition
    def __init__(self, condition: _Optional[_Union[Condition, _Mapping]] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("handle", "revision")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    handle: str
    revision: str
    def __init__(self, handle: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class VelocityRequest(_message.Message):
    __slots__ = ("x", "sigma", "handle", "reply_shared_memory")
    X_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REPLY_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    sigma: _tensor_pb2.Tensor
    handle: str
    reply_shared_memory: _tensor_pb2.SharedMemoryRef
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sigma: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., handle: _Optional[str] = ..., reply_shared_memory: _Optional[_Union[_tensor_pb2.SharedMemoryRef, _Mapping]] = ...) -> None: ...

class VelocityResponse(_message.Message):
    __slots__ = ("velocity", "revision")
    VELOCITY_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    velocity: _tensor_pb2.Tensor
    revision: str
    def __init__(self, velocity: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., revision: _Optional[str] = ...) -> None: ...

class LogProbRequest(_message.Message):
    __slots__ = ("x", "sigma", "handle")
    X_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    sigma: _tensor_pb2.Tensor
    handle: str
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sigma: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., handle: _Optional[str] = ...) -> None: ...

class LogProbResponse(_message.Message):
    __slots__ = ("log_prob", "revision")
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    log_prob: _tensor_pb2.Tensor
    revision: str
    def __init__(self, log_prob: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., revision: _Optional[str] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("x", "sigma", "mode", "seed", "handle", "reply_shared_memory")
    X_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REPLY_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    sigma: _tensor_pb2.Tensor
    mode: ProposeMode
    seed: int
    handle: str
    reply_shared_memory: _tensor_pb2.SharedMemoryRef
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sigma: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., mode: _Optional[_Union[ProposeMode, str]] = ..., seed: _Optional[int] = ..., handle: _Optional[str] = ..., reply_shared_memory: _Optional[_Union[_tensor_pb2.SharedMemoryRef, _Mapping]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("x", "revision")
    X_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    revision: str
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., revision: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("pixels",)
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    pixels: _tensor_pb2.Tensor
    def __init__(self, pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("latents", "revision")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    revision: str
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., revision: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("latents",)
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("pixels", "revision")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    pixels: _tensor_pb2.Tensor
    revision: str
    def __init__(self, pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., revision: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_id", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, model_id: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("stage", "progress", "message", "revision")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    stage: LoadStage
    progress: float
    message: str
    revision: str
    def __init__(self, stage: _Optional[_Union[LoadStage, str]] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class ScheduleRequest(_message.Message):
    __slots__ = ("num_steps", "sample_shape")
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    num_steps: int
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_steps: _Optional[int] = ..., sample_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ScheduleResponse(_message.Message):
    __slots__ = ("sigmas", "revision")
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    sigmas: _containers.RepeatedScalarFieldContainer[float]
    revision: str
    def __init__(self, sigmas: _Optional[_Iterable[float]] = ..., revision: _Optional[str] = ...) -> None: ...

class RenderRequest(_message.Message):
    __slots__ = ("handle", "names")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, handle: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class RenderResponse(_message.Message):
    __slots__ = ("tensors", "revision")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    revision: str
    def __init__(self, tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., revision: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("x", "sigma", "handle", "reply_shared_memory")
    X_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REPLY_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    sigma: _tensor_pb2.Tensor
    handle: str
    reply_shared_memory: _tensor_pb2.SharedMemoryRef
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sigma: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., handle: _Optional[str] = ..., reply_shared_memory: _Optional[_Union[_tensor_pb2.SharedMemoryRef, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("score", "revision")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    score: _tensor_pb2.Tensor
    revision: str
    def __init__(self, score: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., revision: _Optional[str] = ...) -> None: ...

class VelocityVjpRequest(_message.Message):
    __slots__ = ("x", "sigma", "cotangent", "handle", "reply_shared_memory")
    X_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    COTANGENT_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REPLY_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    sigma: _tensor_pb2.Tensor
    cotangent: _tensor_pb2.Tensor
    handle: str
    reply_shared_memory: _tensor_pb2.SharedMemoryRef
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sigma: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cotangent: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., handle: _Optional[str] = ..., reply_shared_memory: _Optional[_Union[_tensor_pb2.SharedMemoryRef, _Mapping]] = ...) -> None: ...

class VelocityVjpResponse(_message.Message):
    __slots__ = ("vjp", "revision")
    VJP_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    vjp: _tensor_pb2.Tensor
    revision: str
    def __init__(self, vjp: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., revision: _Optional[str] = ...) -> None: ...
