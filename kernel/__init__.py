"""poegen's sampling kernel: annealed MCMC + SMC over a product of experts.

Public entry point::

    from poegen.kernel import sample, Factor, SamplerSettings
    result = sample(factors=[...], sample_shape=(2,), settings=SamplerSettings(...),
                    generator=torch.Generator().manual_seed(0))
    result.particles, result.log_weights, result.log_evidence, result.trace
"""

from poegen.kernel.calls import ExpertStats, NonFiniteOutputError
from poegen.kernel.experts import (
    Capability,
    Expert,
    ExpertInfo,
    ExpertKind,
    KernelError,
    available_experts,
    create_expert,
)
from poegen.kernel.potentials import AllParticlesDiedError
from poegen.kernel.sampler import (
    ExpertRecord,
    LevelTrace,
    SampleResult,
    sample,
    sample_iter,
)
from poegen.kernel.spec import Factor, SamplerSettings

__all__ = [
    "AllParticlesDiedError",
    "Capability",
    "Expert",
    "ExpertInfo",
    "ExpertKind",
    "ExpertRecord",
    "ExpertStats",
    "Factor",
    "KernelError",
    "LevelTrace",
    "NonFiniteOutputError",
    "SampleResult",
    "SamplerSettings",
    "available_experts",
    "create_expert",
    "sample",
    "sample_iter",
]
