"""The tensor codec: exact round trips, no copies, validation before allocation, shared memory."""

from __future__ import annotations

import struct
import warnings

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poegen.kernel import codec
from poegen.kernel.codec import (
    SharedMemoryPool,
    SharedMemoryReader,
    decode,
    encode,
    validate_finite,
    validate_sigma,
)
from poegen.kernel.errors import ExpertError
from poegen.v1 import tensor_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# Same-size integer dtype whose bits are compared (NaN payloads, -0.0 and bf16 words included).
_BITS = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.uint8: torch.uint8,
    torch.int64: torch.int64,
    torch.bool: torch.uint8,
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


def _expect(code: grpc.StatusCode, where: str, fn, *args, **kwargs) -> ExpertError:
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


def test_encode_detaches_and_rejects_other_dtypes():
    x = torch.ones(2, requires_grad=True)
    assert torch.equal(decode(encode(x * 2), field="x"), torch.full((2,), 2.0))
    with pytest.raises(TypeError, match="float64"):
        encode(torch.ones(2, dtype=torch.float64))


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
