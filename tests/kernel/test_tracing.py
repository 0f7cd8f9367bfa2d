"""One OpenTelemetry trace from the SDK through the Sampler's job to every expert call it
makes, over real hosts on 127.0.0.1 (spans collected in memory); with tracing off (the
default), no span at all."""

from __future__ import annotations

import pytest
from helpers.remote import LoopThread
from helpers.stack import BAR, MIX, REWARD, spec_data
from helpers.timing import scaled
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from poegen import Client, GenerationSpec
from poegen.expert_servers.analytic import GaussianMixture, LinearReward
from poegen.expert_servers.server import ServerConfig
from poegen.kernel.service import SamplerServerConfig

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)  # once per process: this module is its only user
    return _EXPORTER


def _stack(loop: LoopThread, tracing: bool) -> tuple[str, dict[str, str]]:
    config = ServerConfig(tracing=tracing)
    experts = {
        "mix": loop.serve(GaussianMixture(**MIX), config).address,
        "bar": loop.serve(GaussianMixture(**BAR), config).address,
        "right": loop.serve(LinearReward(**REWARD), config).address,
    }
    return loop.sampler(SamplerServerConfig(tracing=tracing)).address, experts


def test_one_trace_runs_from_the_client_to_every_expert_call(loop: LoopThread, spans):
    spans.clear()
    sampler, experts = _stack(loop, tracing=True)
    spec = GenerationSpec.from_mapping(spec_data())
    with Client(sampler, endpoints=experts, tracing=True) as client:
        client.generate(spec, timeout=scaled(60))
    finished = spans.get_finished_spans()
    generate = [s for s in finished if s.name == "/poegen.v1.SamplerService/Generate"]
    kinds = sorted(s.kind.name for s in generate)
    assert kinds == ["CLIENT", "SERVER"]
    trace_id = generate[0].context.trace_id
    assert {s.context.trace_id for s in generate} == {trace_id}
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    velocity = [s for s in in_trace if s.name == "/poegen.v1.ExpertService/Velocity"]
    # every expert call of the job: the Sampler's client span and the expert's server span
    assert velocity and {s.kind.name for s in velocity} == {"CLIENT", "SERVER"}
    servers = {s.attributes.get("net.peer.name") for s in velocity if s.kind.name == "CLIENT"}
    assert servers  # the Sampler's calls name their peer
    described = [s for s in in_trace if s.name == "/poegen.v1.ExpertService/Describe"]
    assert described


def test_tracing_is_off_by_default(loop: LoopThread, spans):
    spans.clear()
    sampler, experts = _stack(loop, tracing=False)
    with Client(sampler, endpoints=experts) as client:
        client.generate(GenerationSpec.from_mapping(spec_data()), timeout=scaled(60))
    assert spans.get_finished_spans() == ()
