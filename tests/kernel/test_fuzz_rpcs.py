"""Hypothesis fuzzing of every RPC of both hosts, live on 127.0.0.1: random messages built from
each request's descriptor (every field, nested messages, tensors with random dtypes, shapes and
bytes) never get INTERNAL or UNKNOWN, never hang past the deadline, and the host answers a good
call afterwards. ``POEGEN_FUZZ_EXAMPLES`` (default 150 per RPC) asks for more (a bench run)."""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from helpers.remote import LoopThread
from helpers.server_experts import Gaussian
from helpers.timing import scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poegen.kernel.service import SamplerServerConfig
from poegen.v1 import expert_pb2, sampler_pb2, sampler_pb2_grpc

EXPERT = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
SAMPLER = sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"]
EXAMPLES = int(os.environ.get("POEGEN_FUZZ_EXAMPLES", "150"))
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}

_INTS = st.one_of(st.integers(-3, 70), st.integers(-(2**31), 2**31 - 1))
_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_INT64: st.one_of(_INTS, st.integers(-(2**63), 2**63 - 1)),
    FieldDescriptor.TYPE_UINT64: st.one_of(st.integers(0, 70), st.integers(0, 2**64 - 1)),
    FieldDescriptor.TYPE_INT32: _INTS,
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_SINT32: _INTS,
    FieldDescriptor.TYPE_SINT64: _INTS,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.text(max_size=12),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=96),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    return _SCALARS[field.type]


def _message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of ``descriptor`` with any subset of fields set (nesting up to depth 3)."""
    cls = GetMessageClass(descriptor)
    if depth > 3 or not descriptor.fields:
        return st.just(cls())
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields
            fields[field.name] = st.dictionaries(
                _value(key, depth), _value(value, depth), max_size=2
            )
        elif field.is_repeated:
            fields[field.name] = st.lists(_value(field, depth), max_size=3)
        else:
            fields[field.name] = _value(field, depth)

    @st.composite
    def build(draw) -> object:
        message = cls()
        chosen = draw(st.sets(st.sampled_from(sorted(fields)), max_size=len(fields)))
        for name in sorted(chosen):
            value = draw(fields[name])
            target = getattr(message, name)
            if isinstance(value, dict):
                for k, v in value.items():
                    if hasattr(target[k], "CopyFrom"):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif isinstance(value, list):
                target.extend(value)
            elif hasattr(value, "CopyFrom"):
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


@pytest.fixture(scope="module")
def hosts():
    loop = LoopThread()
    expert = loop.serve(Gaussian((1.0, 0.0)))
    sampler = loop.sampler(SamplerServerConfig(expert_retries=0, max_levels=64))
    channels = {
        EXPERT.full_name: grpc.insecure_channel(expert.address),
        SAMPLER.full_name: grpc.insecure_channel(sampler.address),
    }
    yield channels, expert.address
    for channel in channels.values():
        channel.close()
    loop.close()


def _call(channel: grpc.Channel, service, method, message) -> None:
    path = f"/{service.full_name}/{method.name}"
    payload = message.SerializeToString()
    if method.server_streaming:
        for _ in channel.unary_stream(path)(payload, timeout=scaled(30)):
            pass
    else:
        channel.unary_unary(path)(payload, timeout=scaled(30))


@pytest.mark.parametrize(
    ("service", "method"),
    [(s, m) for s in (EXPERT, SAMPLER) for m in s.methods],
    ids=lambda v: getattr(v, "name", None),
)
def test_random_requests_never_break_a_host(hosts, service, method):
    channels, expert_address = hosts
    channel = channels[service.full_name]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_message(method.input_type))
    def fuzz(message) -> None:
        if method.name == "Generate":
            # the first factor names the live expert, so the fuzz reaches past the address check
            for factor in message.factors[:1]:
                factor.address = expert_address
        try:
            _call(channel, service, method, message)
        except grpc.RpcError as e:
            assert e.code() not in NEVER, f"{method.name}: {e.code()}: {e.details()}"

    fuzz()
    # the host serves on
    reply = channels[EXPERT.full_name].unary_unary(f"/{EXPERT.full_name}/Describe")(
        expert_pb2.DescribeRequest().SerializeToString(), timeout=scaled(30)
    )
    assert expert_pb2.DescribeResponse.FromString(reply).name
    settings_ = sampler_pb2.SamplerSettings(num_particles=4, num_steps=2, mcmc_steps=0)
    good = sampler_pb2.GenerateRequest(
        factors=[sampler_pb2.FactorSpec(address=expert_address, weight=1.0)],
        sample_shape=[2],
        settings=settings_,
    )
    stub = sampler_pb2_grpc.SamplerServiceStub(channels[SAMPLER.full_name])
    assert list(stub.Generate(good, timeout=scaled(30)))[-1].HasField("result")
