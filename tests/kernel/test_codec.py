"""The tensor codec: exact round trips, no copies, validation before allocation, shared memory."""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poegen.kernel import codec, refusal
from poegen.kernel.codec import (
    Serialized,
    SharedMemoryPool,
    SharedMemoryReader,
    WireMessage,
    decode,
    encode,
    encode_into,
)
from poegen.kernel.refusal import Code, ExpertError, validate_finite, validate_sigma
from poegen.v1 import expert_pb2, tensor_pb2

INVALID = Code.INVALID_ARGUMENT
EXHAUSTED = Code.RESOURCE_EXHAUSTED

# Same-size integer dtype whose bits are compared (NaN payloads, -0.0 and bf16 words included).
_BITS = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.uint8: torch.uint8,
    torch.int64: torch.int64,
    torch.bool: torch.uint8,
    torch.float64: torch.int64,
}


def _random(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Every bit pattern of the dtype is possible (bool: 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).bool()
    bits = _BITS[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=bits).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def _expect(code: Code, where: str, fn, *args, **kwargs) -> ExpertError:
    """Call fn, expecting an ExpertError with this code on the field ``where``."""
    with pytest.raises(ExpertError) as info:
        fn(*args, **kwargs)
    assert (info.value.code, info.value.field) == (code, where), repr(info.value)
    return info.value


class _StubMessage:
    """Duck-typed Tensor whose ``data`` is one fixed bytes object (upb makes a new one per read)."""

    def __init__(self, dtype: int, shape: list[int], data: bytes) -> None:
        self.dtype, self.shape, self._data = dtype, shape, data
        self.reads = 0

    @property
    def data(self) -> bytes:
        self.reads += 1
        return self._data

    def WhichOneof(self, name: str) -> str:
        return "data"


# --------------------------------------------------------------------------- round trips

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(codec.SUPPORTED_DTYPES),
    shapes,
    st.sampled_from(["contiguous", "transposed", "strided"]),
    st.integers(0, 2**32 - 1),
)
def test_round_trip_is_bit_exact(dtype, shape, layout, seed):
    if layout == "strided":  # every other element of a wider tensor
        t = _random([*shape, 2], dtype, seed)[..., 0]
    else:
        t = _random(shape, dtype, seed)
        if layout == "transposed":  # all dimensions reversed: a non-contiguous view
            t = t.permute(tuple(reversed(range(t.dim()))))
    msg = encode(t)
    assert len(msg.data) == t.numel() * t.element_size()
    out = decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()), field="x")
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(_bits(out), _bits(t))


def test_zero_dim_and_empty():
    for t in (torch.tensor(2.5), torch.empty(0), torch.empty(3, 0, 2, dtype=torch.int64)):
        msg = encode(t)
        assert list(msg.shape) == list(t.shape)
        out = decode(msg, field="x")
        assert out.shape == t.shape and out.dtype == t.dtype and torch.equal(out, t)


def test_wire_bytes_are_little_endian():
    assert encode(torch.tensor([1.0])).data == struct.pack("<f", 1.0)
    assert encode(torch.tensor([1.0], dtype=torch.float16)).data == struct.pack("<e", 1.0)
    assert encode(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"
    assert encode(torch.tensor([258])).data == struct.pack("<q", 258)
    assert encode(torch.tensor([True, False])).data == b"\x01\x00"
    assert encode(torch.tensor([1.0], dtype=torch.float64)).data == struct.pack("<d", 1.0)
    assert encode(torch.tensor([1.0], dtype=torch.float64)).dtype == tensor_pb2.DTYPE_F64


def test_encode_detaches_and_rejects_other_dtypes():
    x = torch.ones(2, requires_grad=True)
    assert torch.equal(decode(encode(x * 2), field="x"), torch.full((2,), 2.0))
    for dtype in (torch.int32, torch.complex64):
        with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
            encode(torch.ones(2, dtype=dtype))


# --------------------------------------------------------------------------- no copies


def test_decode_views_the_message_bytes():
    data = struct.pack("<6f", *range(6))
    msg = _StubMessage(tensor_pb2.DTYPE_F32, [2, 3], data)
    out = decode(msg, field="x")  # type: ignore[arg-type]
    address = np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert out.data_ptr() == address  # the tensor is the bytes, not a copy of them
    assert msg.reads == 1
    assert out.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_decode_bf16_and_bool_views_too():
    for proto, dtype, data in [
        (tensor_pb2.DTYPE_BF16, torch.bfloat16, b"\x80\x3f\x00\x40"),
        (tensor_pb2.DTYPE_BOOL, torch.bool, b"\x01\x00"),
    ]:
        out = decode(_StubMessage(proto, [2], data), field="x")  # type: ignore[arg-type]
        assert out.dtype == dtype
        assert out.data_ptr() == np.frombuffer(data, dtype=np.uint8).ctypes.data


def test_decode_does_not_warn():
    msg = encode(torch.arange(4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode(msg, field="x")


# --------------------------------------------------------------------------- validation


def test_dtype_unset_or_unknown():
    _expect(INVALID, "x.dtype", decode, tensor_pb2.Tensor(shape=[1], data=b"\0" * 4), field="x")
    err = _expect(INVALID, "x.dtype", decode, tensor_pb2.Tensor(dtype=99, shape=[1]), field="x")
    assert "99" in err.reason


def test_shape_checks():
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_F32, shape=[2, -1], data=b"")
    _expect(INVALID, "x.shape", decode, msg, field="x")
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_U8, shape=[1] * 33, data=b"\0")
    _expect(INVALID, "x.shape", decode, msg, field="x")


@pytest.mark.parametrize(
    "shape",
    [[2**40, 2**40], [2**40, 2**40, 0], [2**62], [2**31, 2**31, 2**31], [2**63 - 1] * 2],
)
def test_overflowing_shapes_are_refused_before_reading_the_data(shape):
    class _Untouchable(_StubMessage):
        @property
        def data(self) -> bytes:
            raise AssertionError("decode read the data of an oversized tensor")

    msg = _Untouchable(tensor_pb2.DTYPE_I64, shape, b"")
    _expect(EXHAUSTED, "x.shape", decode, msg, field="x")


def test_max_bytes():
    msg = encode(torch.zeros(4, 4))  # 64 bytes
    assert decode(msg, field="x", max_bytes=64).shape == (4, 4)
    _expect(EXHAUSTED, "x.shape", decode, msg, field="x", max_bytes=63)


@pytest.mark.parametrize("data", [b"", b"\0" * 7, b"\0" * 9])
def test_byte_count_mismatch(data):
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_F32, shape=[2], data=data)
    _expect(INVALID, "sigma.data", decode, msg, field="sigma")


def test_bool_bytes_must_be_0_or_1():
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BOOL, shape=[2], data=b"\x01\x02")
    _expect(INVALID, "mask.data", decode, msg, field="mask")


def test_validate_finite():
    assert validate_finite(torch.ones(3), "x") is not None
    validate_finite(torch.tensor([2**62]), "x")  # integers are always finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        _expect(INVALID, "x", validate_finite, torch.tensor([0.0, bad]), "x")
    _expect(INVALID, "x", validate_finite, torch.tensor([float("nan")], dtype=torch.bfloat16), "x")


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16), max_size=64),
    st.sampled_from([1.0, 1e4, 1e38, 1e300]),
)
def test_all_finite_agrees_with_the_elementwise_check(dtype, values, scale):
    # scale makes sums of finite values overflow (the fast path must then fall back)
    t = (torch.tensor(values, dtype=torch.float64) * scale).to(dtype)
    assert refusal.all_finite(t) == bool(torch.isfinite(t).all())


def test_validate_sigma():
    sigma = torch.tensor([1.0, 0.5, 1e-6])
    assert validate_sigma(sigma, 3) is sigma
    _expect(INVALID, "sigma.shape", validate_sigma, sigma, 2)
    _expect(INVALID, "sigma.shape", validate_sigma, torch.tensor(0.5), 1)
    _expect(INVALID, "sigma.shape", validate_sigma, torch.ones(1, 1), 1)
    _expect(INVALID, "sigma.dtype", validate_sigma, torch.ones(2, dtype=torch.int64), 2)
    for bad in (0.0, -0.1, 1.0001, float("nan"), float("inf")):
        _expect(INVALID, "sigma", validate_sigma, torch.tensor([0.5, bad]), 2)
    _expect(INVALID, "levels", validate_sigma, torch.tensor([0.0]), 1, field="levels")


# --------------------------------------------------------------------------- WireMessage


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(codec.SUPPORTED_DTYPES),
    shapes,
    st.sampled_from(["contiguous", "transposed"]),
    st.integers(0, 2**32 - 1),
)
def test_wire_message_parses_to_what_encode_gives(dtype, shape, layout, seed):
    t = _random(shape, dtype, seed)
    if layout == "transposed":
        t = t.permute(tuple(reversed(range(t.dim()))))
    sigma = torch.rand(3, dtype=torch.float64)
    wire = WireMessage(expert_pb2.VelocityRequest(handle="h"), {"x": t, "sigma": sigma})
    parsed = expert_pb2.VelocityRequest.FromString(wire.SerializeToString())
    expected = expert_pb2.VelocityRequest(x=encode(t), sigma=encode(sigma), handle="h")
    assert parsed == expected
    assert torch.equal(_bits(decode(parsed.x, field="x")), _bits(t))


def test_wire_message_copies_each_tensor_once_and_checks_fields():
    x = torch.arange(6.0)
    wire = WireMessage(expert_pb2.VelocityRequest(), {"x": x})
    assert not wire.message.x.data  # only the header lives in the message
    wire.message.handle = "later"  # the message may change until it is serialised
    parsed = expert_pb2.VelocityRequest.FromString(wire.SerializeToString())
    assert parsed.handle == "later" and parsed.x.data == x.numpy().tobytes()
    with pytest.raises(ValueError, match="handle"):
        WireMessage(expert_pb2.VelocityRequest(), {"handle": x})
    with pytest.raises(TypeError):
        WireMessage(expert_pb2.VelocityRequest(), {"x": x.to(torch.int32)})


def test_serialized_is_sent_as_is():
    msg = expert_pb2.VelocityResponse(revision="r")
    assert Serialized(msg.SerializeToString()).SerializeToString() == msg.SerializeToString()


# --------------------------------------------------------------------------- shared memory


@pytest.fixture
def pool():
    with SharedMemoryPool(segment_bytes=1 << 16, max_bytes=1 << 20, min_tensor_bytes=1) as p:
        yield p


@pytest.fixture
def reader():
    with SharedMemoryReader(max_segments=2) as r:
        yield r


@pytest.mark.parametrize("dtype", codec.SUPPORTED_DTYPES)
def test_shared_memory_round_trip(pool, reader, dtype):
    t = _random([7, 5], dtype, seed=1).mT
    msg = encode(t, shared_memory=pool)
    assert msg.WhichOneof("storage") == "shared_memory" and not msg.data
    out = decode(
        tensor_pb2.Tensor.FromString(msg.SerializeToString()), field="x", shared_memory=reader
    )
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(t))


def test_shared_memory_decode_is_a_private_writable_copy(pool, reader):
    msg = encode(torch.zeros(8), shared_memory=pool)
    out = decode(msg, field="x", shared_memory=reader)
    out += 1  # writable, and not the writer's memory
    again = decode(msg, field="x", shared_memory=reader)
    assert torch.equal(again, torch.zeros(8))


def test_pool_reuses_after_reset_and_grows(pool):
    a = encode(torch.zeros(100), shared_memory=pool).shared_memory
    b = encode(torch.zeros(100), shared_memory=pool).shared_memory
    assert a.name == b.name and b.offset >= a.offset + a.nbytes and b.offset % 64 == 0
    pool.reset()
    c = encode(torch.zeros(100), shared_memory=pool).shared_memory
    assert (c.name, c.offset) == (a.name, 0)
    big = encode(torch.zeros(1 << 15), shared_memory=pool).shared_memory  # 128 KiB > segment
    assert big.name != a.name and pool.nbytes == (1 << 16) + (1 << 17)
    # over max_bytes: inline, and the pool still serves what fits
    assert encode(torch.zeros(1 << 18), shared_memory=pool).WhichOneof("storage") == "data"
    assert encode(torch.zeros(10), shared_memory=pool).WhichOneof("storage") == "shared_memory"


def test_small_tensors_stay_inline():
    with SharedMemoryPool() as pool:
        assert encode(torch.zeros(4), shared_memory=pool).WhichOneof("storage") == "data"
        assert pool.nbytes == 0


def test_close_unlinks_segments(reader):
    pool = SharedMemoryPool(min_tensor_bytes=1)
    msg = encode(torch.ones(4), shared_memory=pool)
    assert torch.equal(decode(msg, field="x", shared_memory=reader), torch.ones(4))
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError):
        encode(torch.ones(4), shared_memory=pool)
    with SharedMemoryReader() as fresh:  # `reader` may still hold the unlinked segment open
        err = _expect(INVALID, "x.shared_memory.name", decode, msg, field="x", shared_memory=fresh)
    assert msg.shared_memory.name not in str(err)


def test_reader_cache_is_bounded(reader):
    pools = [SharedMemoryPool(min_tensor_bytes=1) for _ in range(3)]
    try:
        msgs = [encode(torch.full((4,), float(i)), shared_memory=p) for i, p in enumerate(pools)]
        for _ in range(2):
            for i, msg in enumerate(msgs):
                assert decode(msg, field="x", shared_memory=reader).tolist() == [i] * 4
                assert len(reader._fds) <= 2
    finally:
        for p in pools:
            p.close()


def test_shared_memory_needs_the_reader_opt_in(pool):
    msg = encode(torch.ones(4), shared_memory=pool)
    err = _expect(INVALID, "x.shared_memory", decode, msg, field="x")
    assert msg.shared_memory.name not in str(err)


def _shm_message(name: str, offset: int, nbytes: int) -> tensor_pb2.Tensor:
    ref = tensor_pb2.SharedMemoryRef(name=name, offset=offset, nbytes=nbytes)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_F32, shape=[4], shared_memory=ref)


FOREIGN_NAMES = [
    "",
    "psm_0123456789abcdef",
    "../../etc/passwd",
    "/poegen_0123456789abcdef",
    "poegen_xyz",
    "poegen_0123456789abcdef/../x",
    "poegen_0123456789abcdef\n",
]


@pytest.mark.parametrize("name", FOREIGN_NAMES)
def test_reader_refuses_foreign_names_without_echoing_them(reader, name):
    msg = _shm_message(name, 0, 16)
    err = _expect(INVALID, "x.shared_memory.name", decode, msg, field="x", shared_memory=reader)
    assert not name or name not in str(err)


def test_reader_refuses_a_missing_segment_without_naming_it(reader):
    name = "poegen_" + "0" * 16
    msg = _shm_message(name, 0, 16)
    err = _expect(INVALID, "x.shared_memory.name", decode, msg, field="x", shared_memory=reader)
    assert name not in str(err)


def test_reader_bounds_checks_offset_and_size(pool, reader):
    ref = encode(torch.ones(4), shared_memory=pool).shared_memory
    size = 1 << 16  # the pool's segment size
    cases = [
        (ref.offset, 12, "x.shared_memory.nbytes"),
        (-1, 16, "x.shared_memory.offset"),
        (size - 8, 16, "x.shared_memory.offset"),
        (2**62, 16, "x.shared_memory.offset"),
    ]
    for offset, nbytes, field in cases:
        msg = _shm_message(ref.name, offset, nbytes)
        err = _expect(INVALID, field, decode, msg, field="x", shared_memory=reader)
        assert ref.name not in str(err)
    last = decode(_shm_message(ref.name, size - 16, 16), field="x", shared_memory=reader)
    assert last.shape == (4,)


# --------------------------------------------------------------------------- reply rooms


@pytest.mark.parametrize("dtype", codec.SUPPORTED_DTYPES)
def test_reply_room_round_trip(pool, reader, dtype):
    """The client reserves room, the server writes the reply there, the client reads it back."""
    t = _random([5, 7], dtype, seed=2)
    nbytes = t.numel() * t.element_size()
    room = pool.reserve(nbytes)
    reader.check_room(room, nbytes, field="reply_shared_memory")
    msg = encode_into(t, room, reader, field="reply_shared_memory")
    assert msg.WhichOneof("storage") == "shared_memory" and msg.shared_memory == room
    parsed = tensor_pb2.Tensor.FromString(msg.SerializeToString())
    out = decode(parsed, field="velocity", shared_memory=pool)
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(t))
    out.zero_()  # a private, writable copy
    assert torch.equal(_bits(decode(parsed, field="v", shared_memory=pool)), _bits(t))


def test_reserve_shares_the_pools_limits(pool):
    a = encode(torch.zeros(100), shared_memory=pool).shared_memory
    room = pool.reserve(400)
    assert room.name == a.name and room.offset >= a.offset + a.nbytes and room.offset % 64 == 0
    assert pool.reserve(1 << 21) is None  # over max_bytes: the reply comes inline
    with SharedMemoryPool(min_tensor_bytes=1024) as small:
        assert small.reserve(1000) is None


def test_reply_room_checks_name_size_and_bounds_without_naming_the_segment(pool, reader):
    room = pool.reserve(64)
    size = 1 << 16  # the pool's segment size
    cases = [
        (tensor_pb2.SharedMemoryRef(name="psm_x", offset=0, nbytes=64), "name"),
        (tensor_pb2.SharedMemoryRef(name="poegen_" + "0" * 16, offset=0, nbytes=64), "name"),
        (tensor_pb2.SharedMemoryRef(name=room.name, offset=0, nbytes=32), "nbytes"),
        (tensor_pb2.SharedMemoryRef(name=room.name, offset=-64, nbytes=64), "offset"),
        (tensor_pb2.SharedMemoryRef(name=room.name, offset=size - 32, nbytes=64), "offset"),
    ]
    for ref, part in cases:
        field = f"reply_shared_memory.{part}"
        err = _expect(INVALID, field, reader.check_room, ref, 64, field="reply_shared_memory")
        assert ref.name not in str(err) or not ref.name
        arr = np.zeros(16, dtype=np.float32)
        _expect(INVALID, field, reader.write, ref, arr, field="reply_shared_memory")
    # the client only reads rooms of its own pool, within bounds
    foreign = tensor_pb2.SharedMemoryRef(name="poegen_" + "1" * 16, offset=0, nbytes=64)
    err = _expect(INVALID, "v.name", pool.read, foreign, 64, field="v")
    assert foreign.name not in str(err)
    past = tensor_pb2.SharedMemoryRef(name=room.name, offset=size - 32, nbytes=64)
    _expect(INVALID, "v.offset", pool.read, past, 64, field="v")
    _expect(INVALID, "v.nbytes", pool.read, room, 32, field="v")


def test_a_truncated_room_is_an_error_not_a_crash(reader):
    pool = SharedMemoryPool(segment_bytes=1 << 16, min_tensor_bytes=1)
    try:
        room = pool.reserve(4096)
        name = room.name
        os.truncate(f"/dev/shm/{name}", 1024)  # what a hostile peer could do
        _expect(INVALID, "v.offset", pool.read, room, 4096, field="v")
        arr = np.zeros(1024, dtype=np.float32)
        _expect(INVALID, "r.offset", reader.write, room, arr, field="r")
    finally:
        pool.close()
