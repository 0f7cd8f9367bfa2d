"""Bytes that are no valid request: INVALID_ARGUMENT on ``request`` from every RPC of both hosts
(once UNKNOWN, naming ``google.protobuf.message.DecodeError``), and the hosts serve on."""

from __future__ import annotations

import grpc
import pytest
from helpers.remote import LoopThread
from helpers.server_experts import Gaussian
from helpers.timing import scaled

from poegen.kernel.errors import from_rpc_error
from poegen.v1 import expert_pb2, sampler_pb2

EXPERT = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
SAMPLER = sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"]
GARBAGE = {
    "corrupt": b"\xff\xff\xff",  # a field tag with no end
    "truncated": b"\x0a\x05ab",  # a length-delimited field 5 long, 2 bytes sent
}


def _call(channel: grpc.Channel, service, method, payload: bytes) -> None:
    path = f"/{service.full_name}/{method.name}"
    if method.server_streaming:
        list(channel.unary_stream(path)(payload, timeout=scaled(30)))
    else:
        channel.unary_unary(path)(payload, timeout=scaled(30))


@pytest.fixture
def hosts(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0)))
    sampler = loop.sampler()
    return {EXPERT.full_name: expert.address, SAMPLER.full_name: sampler.address}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
@pytest.mark.parametrize(
    ("service", "method"),
    [(s, m) for s in (EXPERT, SAMPLER) for m in s.methods],
    ids=lambda v: getattr(v, "name", None),
)
def test_garbage_bytes_are_refused_on_request(hosts, service, method, kind):
    with grpc.insecure_channel(hosts[service.full_name]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _call(channel, service, method, GARBAGE[kind])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        err = from_rpc_error(caught.value)
        assert err is not None and err.field == "request"
        assert method.input_type.full_name in err.reason
        assert "<class" not in caught.value.details()
        # the host serves on: a well-formed Describe / an empty Generate gets its own answer
        if service is EXPERT:
            reply = channel.unary_unary(f"/{EXPERT.full_name}/Describe")(
                expert_pb2.DescribeRequest().SerializeToString(), timeout=scaled(30)
            )
            assert expert_pb2.DescribeResponse.FromString(reply).name
        else:
            with pytest.raises(grpc.RpcError) as empty:
                _call(channel, SAMPLER, SAMPLER.methods_by_name["Generate"], b"")
            assert from_rpc_error(empty.value).field == "factors"


@pytest.mark.parametrize("name", ["Release", "LoadModel", "Render"])
def test_a_string_field_with_bad_utf8_is_refused_on_request(hosts, name):
    method = EXPERT.methods_by_name[name]
    assert method.input_type.fields_by_number[1].type == method.input_type.fields[0].TYPE_STRING
    with (
        grpc.insecure_channel(hosts[EXPERT.full_name]) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        _call(channel, EXPERT, method, b"\x0a\x02\xc3\x28")  # field 1: "\xc3(" is no UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(caught.value).field == "request"
    assert "UTF-8" in caught.value.details()
