"""codec.parse: the received-bytes parser gives protobuf's answer, and keeps tensor bytes in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from poegen.kernel import codec
from poegen.kernel.codec import Received, WireMessage, decode_field, encode, parse, parser
from poegen.v1 import expert_pb2, tensor_pb2

VELOCITY_TENSORS = {1: "x", 2: "sigma"}


def _parsed(buffer: bytes) -> Received:
    return parse(expert_pb2.VelocityRequest, VELOCITY_TENSORS, buffer)


def _restored(received: Received) -> expert_pb2.VelocityRequest:
    """The message with the kept bytes put back: what protobuf's parser returns."""
    message = expert_pb2.VelocityRequest()
    message.CopyFrom(received.message)
    for name, view in received.inline.items():
        getattr(message, name).data = bytes(view)
    return message


def _same_as_protobuf(buffer: bytes) -> None:
    try:
        expected = expert_pb2.VelocityRequest.FromString(buffer)
    except DecodeError:
        with pytest.raises(DecodeError):
            _parsed(buffer)
        return
    received = _parsed(buffer)
    assert _restored(received) == expected
    for name in received.inline:  # a kept field reads as inline data, as protobuf has it
        assert getattr(expected, name).WhichOneof("storage") == "data"


_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])
_SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """VelocityRequests as the kernel sends them (WireMessage: each tensor field twice) or as
    other clients might (encode: once), in shared memory, with extra occurrences and fields."""
    message = expert_pb2.VelocityRequest(handle=draw(st.text(max_size=8)))
    if draw(st.booleans()):
        message.reply_shared_memory.CopyFrom(
            tensor_pb2.SharedMemoryRef(name="poegen_" + "a" * 16, offset=64, nbytes=128)
        )
    x = torch.randn(draw(_SHAPES)).to(draw(_DTYPES))
    sigma = torch.rand(draw(st.integers(0, 3)))
    how = draw(st.sampled_from(["wire", "encode", "shared_memory"]))
    if how == "wire":
        buffer = WireMessage(message, {"x": x, "sigma": sigma}).SerializeToString()
    else:
        message.x.CopyFrom(encode(x))
        if how == "shared_memory":
            message.x.shared_memory.CopyFrom(tensor_pb2.SharedMemoryRef(name="poegen_" + "b" * 16))
        message.sigma.CopyFrom(encode(sigma))
        buffer = message.SerializeToString()
    for _ in range(draw(st.integers(0, 2))):  # later occurrences merge into earlier ones
        extra = expert_pb2.VelocityRequest()
        choice = draw(st.sampled_from(["data", "shape", "shared_memory", "handle", "unknown"]))
        if choice == "data":
            extra.x.data = draw(st.binary(max_size=16))
        elif choice == "shape":
            extra.x.shape.extend(draw(_SHAPES))
        elif choice == "shared_memory":
            extra.sigma.shared_memory.CopyFrom(tensor_pb2.SharedMemoryRef(nbytes=4))
        elif choice == "handle":
            extra.handle = "h"
        buffer += extra.SerializeToString() if choice != "unknown" else b"\xf8\x07\x05"
    return buffer


@settings(max_examples=300, deadline=None)
@given(requests())
def test_parse_equals_protobuf(buffer: bytes) -> None:
    _same_as_protobuf(buffer)


@settings(max_examples=300, deadline=None)
@given(requests(), st.data())
def test_parse_equals_protobuf_on_damaged_bytes(buffer: bytes, data: st.DataObject) -> None:
    """Truncated or corrupted messages: the same message, or the same refusal."""
    if not buffer:
        return
    damaged = bytearray(buffer)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(damaged) - 1))
        damaged[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    _same_as_protobuf(bytes(damaged[:cut]))


def test_groups_and_bad_varints_go_to_protobuf() -> None:
    for buffer in (b"\x0b\x0c", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\x05"):
        _same_as_protobuf(buffer)


def test_the_kernels_request_keeps_its_tensor_bytes_in_the_buffer() -> None:
    x, sigma = torch.randn(2, 16, 8, 8), torch.full((2,), 0.5)
    buffer = WireMessage(expert_pb2.VelocityRequest(handle="h"), {"x": x, "sigma": sigma})
    data = buffer.SerializeToString()
    received = parser(expert_pb2.VelocityRequest)(data)
    assert isinstance(received, Received)
    assert set(received.inline) == {"x", "sigma"}
    assert received.handle == "h" and received.HasField("x")  # the message's attributes
    assert received.message.x.data == b""  # left out of the parsed message
    decoded = decode_field(received, "x")
    assert torch.equal(decoded, x) and torch.equal(decode_field(received, "sigma"), sigma)
    # a view of the received bytes: no copy was made
    start = np.frombuffer(data, np.uint8).ctypes.data
    assert start <= decoded.data_ptr() < start + len(data)


def test_messages_without_top_level_tensors_parse_as_usual() -> None:
    assert parser(expert_pb2.PrepareRequest) == expert_pb2.PrepareRequest.FromString
    assert parser(tensor_pb2.SharedMemoryRef) == tensor_pb2.SharedMemoryRef.FromString


def test_decode_field_reads_plain_messages_too() -> None:
    message = expert_pb2.VelocityRequest(x=encode(torch.arange(3.0)))
    assert torch.equal(decode_field(message, "x"), torch.arange(3.0))
    with pytest.raises(codec.ExpertError) as refused:
        decode_field(Received(message, {"x": memoryview(b"\0" * 8)}), "x", field="request.x")
    assert refused.value.field == "request.x.data"  # 8 bytes for 3 float32s
