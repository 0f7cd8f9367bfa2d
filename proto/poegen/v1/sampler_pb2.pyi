from poegen.v1 import expert_pb2 as _expert_pb2
from poegen.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class FactorSpec(_message.Message):
    __slots__ = ("address", "weight", "condition", "region", "name", "links", "crop", "parents")
    class ParentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    address: str
    weight: float
    condition: _expert_pb2.Condition
    region: _tensor_pb2.Tensor
    name: str
    links: _containers.RepeatedCompositeFieldContainer[ConditionLink]
    crop: _containers.RepeatedCompositeFieldContainer[Span]
    parents: _containers.ScalarMap[str, float]
    def __init__(self, address: _Optional[str] = ..., weight: _Optional[float] = ..., condition: _Optional[_Union[_expert_pb2.Condition, _Mapping]] = ..., region: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., name: _Optional[str] = ..., links: _Optional[_Iterable[_Union[ConditionLink, _Mapping]]] = ..., crop: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., parents: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class ConditionLink(_message.Message):
    __slots__ = ("tensor", "source", "output")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    source: str
    output: str
    def __init__(self, tensor: _Optional[str] = ..., source: _Optional[str] = ..., output: _Optional[str] = ...) -> None: ...

class ConditionSource(_message.Message):
    __slots__ = ("name", "address", "condition")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    condition: _expert_pb2.Condition
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., condition: _Optional[_Union[_expert_pb2.Condition, _Mapping]] = ...) -> None: ...

class SamplerSettings(_message.Message):
    __slots__ = ("num_particles", "num_steps", "mcmc_steps", "schedule", "shift", "sigmas", "mcmc", "step_size", "step_rule", "leapfrog_steps", "damping", "ess_threshold", "resampling", "tempering", "tempering_rate", "tempering_ess", "weighting", "max_batch", "preset", "constraint_penalty", "mcmc_rewards", "transition", "sde_noise", "adapt_step_size", "fk_control")
    NUM_PARTICLES_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    MCMC_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    MCMC_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_RULE_FIELD_NUMBER: _ClassVar[int]
    LEAPFROG_STEPS_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    ESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RESAMPLING_FIELD_NUMBER: _ClassVar[int]
    TEMPERING_FIELD_NUMBER: _ClassVar[int]
    TEMPERING_RATE_FIELD_NUMBER: _ClassVar[int]
    TEMPERING_ESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MCMC_REWARDS_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    SDE_NOISE_FIELD_NUMBER: _ClassVar[int]
    ADAPT_STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    FK_CONTROL_FIELD_NUMBER: _ClassVar[int]
    num_particles: int
    num_steps: int
    mcmc_steps: int
    schedule: str
    shift: float
    sigmas: _containers.RepeatedScalarFieldContainer[float]
    mcmc: str
    step_size: float
    step_rule: str
    leapfrog_steps: int
    damping: float
    ess_threshold: float
    resampling: str
    tempering: str
    tempering_rate: float
    tempering_ess: float
    weighting: str
    max_batch: int
    preset: str
    constraint_penalty: float
    mcmc_rewards: bool
    transition: str
    sde_noise: float
    adapt_step_size: bool
    fk_control: bool
    def __init__(self, num_particles: _Optional[int] = ..., num_steps: _Optional[int] = ..., mcmc_steps: _Optional[int] = ..., schedule: _Optional[str] = ..., shift: _Optional[float] = ..., sigmas: _Optional[_Iterable[float]] = ..., mcmc: _Optional[str] = ..., step_size: _Optional[float] = ..., step_rule: _Optional[str] = ..., leapfrog_steps: _Optional[int] = ..., damping: _Optional[float] = ..., ess_threshold: _Optional[float] = ..., resampling: _Optional[str] = ..., tempering: _Optional[str] = ..., tempering_rate: _Optional[float] = ..., tempering_ess: _Optional[float] = ..., weighting: _Optional[str] = ..., max_batch: _Optional[int] = ..., preset: _Optional[str] = ..., constraint_penalty: _Optional[float] = ..., mcmc_rewards: _Optional[bool] = ..., transition: _Optional[str] = ..., sde_noise: _Optional[float] = ..., adapt_step_size: _Optional[bool] = ..., fk_control: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("factors", "sample_shape", "settings", "seed", "preview", "sources", "job_id", "detach")
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    factors: _containers.RepeatedCompositeFieldContainer[FactorSpec]
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    settings: SamplerSettings
    seed: int
    preview: bool
    sources: _containers.RepeatedCompositeFieldContainer[ConditionSource]
    job_id: str
    detach: bool
    def __init__(self, factors: _Optional[_Iterable[_Union[FactorSpec, _Mapping]]] = ..., sample_shape: _Optional[_Iterable[int]] = ..., settings: _Optional[_Union[SamplerSettings, _Mapping]] = ..., seed: _Optional[int] = ..., preview: _Optional[bool] = ..., sources: _Optional[_Iterable[_Union[ConditionSource, _Mapping]]] = ..., job_id: _Optional[str] = ..., detach: _Optional[bool] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "state", "levels_done", "levels", "error_code", "error_message", "resumes", "error_field", "created_at", "ended_at")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_DONE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    levels_done: int
    levels: int
    error_code: int
    error_message: str
    resumes: int
    error_field: str
    created_at: float
    ended_at: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., levels_done: _Optional[int] = ..., levels: _Optional[int] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., resumes: _Optional[int] = ..., error_field: _Optional[str] = ..., created_at: _Optional[float] = ..., ended_at: _Optional[float] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("level", "result", "job")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    level: LevelEvent
    result: GenerateResult
    job: JobStatus
    def __init__(self, level: _Optional[_Union[LevelEvent, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ..., job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class ExpertTiming(_message.Message):
    __slots__ = ("name", "calls", "seconds", "samples", "vjp_samples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    VJP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    calls: int
    seconds: float
    samples: int
    vjp_samples: int
    def __init__(self, name: _Optional[str] = ..., calls: _Optional[int] = ..., seconds: _Optional[float] = ..., samples: _Optional[int] = ..., vjp_samples: _Optional[int] = ...) -> None: ...

class LevelEvent(_message.Message):
    __slots__ = ("step", "sigma", "ess", "resampled", "acceptance_rate", "log_weight_spread", "reward_scale", "timings", "preview", "log_evidence")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    ESS_FIELD_NUMBER: _ClassVar[int]
    RESAMPLED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    LOG_WEIGHT_SPREAD_FIELD_NUMBER: _ClassVar[int]
    REWARD_SCALE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    LOG_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    step: int
    sigma: float
    ess: float
    resampled: bool
    acceptance_rate: float
    log_weight_spread: float
    reward_scale: float
    timings: _containers.RepeatedCompositeFieldContainer[ExpertTiming]
    preview: _tensor_pb2.Tensor
    log_evidence: float
    def __init__(self, step: _Optional[int] = ..., sigma: _Optional[float] = ..., ess: _Optional[float] = ..., resampled: _Optional[bool] = ..., acceptance_rate: _Optional[float] = ..., log_weight_spread: _Optional[float] = ..., reward_scale: _Optional[float] = ..., timings: _Optional[_Iterable[_Union[ExpertTiming, _Mapping]]] = ..., preview: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., log_evidence: _Optional[float] = ...) -> None: ...

class ExpertRecord(_message.Message):
    __slots__ = ("name", "model_id", "revision", "revisions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    revision: str
    revisions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., revision: _Optional[str] = ..., revisions: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("particles", "log_weights", "log_evidence", "best_index", "experts", "transition")
    PARTICLES_FIELD_NUMBER: _ClassVar[int]
    LOG_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LOG_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    BEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    particles: _tensor_pb2.Tensor
    log_weights: _tensor_pb2.Tensor
    log_evidence: float
    best_index: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRecord]
    transition: str
    def __init__(self, particles: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., log_weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., log_evidence: _Optional[float] = ..., best_index: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertRecord, _Mapping]]] = ..., transition: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("level", "result", "job")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    level: LevelEvent
    result: GenerateResult
    job: JobStatus
    def __init__(self, level: _Optional[_Union[LevelEvent, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ..., job: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...
