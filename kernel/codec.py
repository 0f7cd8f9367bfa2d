"""The tensor codec: every tensor that crosses the wire goes through :func:`encode` / :func:`decode`.

Wire format (``poegen.v1.Tensor``): a ``Dtype``, a shape (outermost first, empty for 0-d) and
``prod(shape) * itemsize`` bytes, row-major, little-endian, no padding, either inline
(``data``) or in a shared-memory segment (``shared_memory``, opt-in on both ends).

=========  ==============  =====================================================
Dtype      torch           bytes per element
=========  ==============  =====================================================
F32        float32         4, IEEE binary32
F16        float16         2, IEEE binary16
BF16       bfloat16        2, the raw 16-bit words (upper half of a binary32)
U8         uint8           1
I64        int64           8
BOOL       bool            1, 0 or 1 (anything else is rejected)
F64        float64         8, IEEE binary64 (added in a later revision of the wire: older
                           readers reject it as an unknown dtype)
=========  ==============  =====================================================

Encoding::

    msg = encode(x)                          # any device, any strides; copies to CPU bytes
    msg = encode(x, shared_memory=pool)      # large tensors go to `pool`'s segments
    req = WireMessage(VelocityRequest(handle=h), {"x": x, "sigma": s})   # for large tensors

Other dtypes (int32, complex, ...) raise ``TypeError``: convert explicitly first.

**Copies on the way out.** ``encode`` makes the bytes once, and protobuf copies them again on
assignment and at serialisation. :class:`WireMessage` (what the kernel's client and the expert
host send) puts only each tensor's header in the message and appends the data when the message
is serialised, a second occurrence of the field that parsers merge: one copy, same wire
format. :class:`Serialized` carries bytes already serialised (in a worker thread, off the
event loop). Both only need gRPC to call ``SerializeToString()`` (see
:mod:`poegen.kernel.transport`).

Decoding validates before it allocates anything, and raises :class:`ExpertError` naming the
field (``field="x"`` gives ``"x.dtype"``, ``"x.shape"``, ``"x.data"``, ``"x.shared_memory.*"``):

* INVALID_ARGUMENT: dtype unset or unknown; more than :data:`MAX_DIMS` dimensions; a negative
  dimension; ``len(data) != prod(shape) * itemsize``; a bool byte other than 0 or 1; a
  shared-memory tensor when the reader did not opt in; a bad segment name, offset or size.
* RESOURCE_EXHAUSTED: ``prod(shape) * itemsize`` over ``max_bytes``, or over 2**62 (checked
  with Python integers, dimension by dimension, so ``[2**40, 2**40]`` never reaches torch).

**Receiving without copies.** The upb protobuf runtime copies a ``bytes`` field into its arena
while parsing, and again into a fresh ``bytes`` object on each access. :func:`parser` (the
gRPC deserializer of the expert host's requests and the kernel's replies) avoids both for the
top-level tensors of a message: :func:`parse` hands protobuf the message without those
tensors' ``data`` and keeps views of their bytes in the buffer gRPC received
(:class:`Received`), which :func:`decode_field` decodes in place. Same result as protobuf's
own parser, including repeated occurrences and malformed input (left to protobuf).

**Ownership of decoded tensors.** Inline ``data`` is not copied: the tensor is a view of the
received buffer (:func:`decode_field` of a :class:`Received`) or of the ``bytes`` object the
message returned (it is the only copy decode causes). Python ``bytes`` are immutable, so the
result is *read-only-backed*: never write into it in place (``x.add_(1)``,
``x[0] = 0``, ``out=x``); use out-of-place operations or ``x.clone()`` first. Torch's one-time
"non-writable buffer" warning is silenced for this conversion only. A tensor decoded from
shared memory is a private, writable copy.

**Shared memory** (co-located peers, same user, POSIX hosts). Off unless both ends opt in: the
writer passes a :class:`SharedMemoryPool` to ``encode``, the reader a
:class:`SharedMemoryReader` to ``decode``. Protocol: *the bytes a ``SharedMemoryRef`` points
at are valid only until the RPC that carries it completes.* The reader therefore copies them
out during ``decode`` (one ``memcpy`` through a mapping of the segment) and never keeps a view;
the writer may call ``pool.reset()`` and overwrite the segments once the reply has arrived. Segments are created mode 0600 with names
``poegen_<random>``; the reader accepts only such names, opens them read-only, bounds-checks
offset and size against the segment, and never repeats a name or any host detail in an error.

**Replies through shared memory.** A server cannot lend its own memory to a reply (the call is
over before the client reads it), so the *client* lends its: it reserves room in its pool
(:meth:`SharedMemoryPool.reserve`) and names it in the request (``reply_shared_memory``); the
server checks the room (:meth:`SharedMemoryReader.check_room`: name, exact size, bounds)
before any work, writes the reply there straight from the result's memory (:func:`encode_into`,
one ``memcpy`` through a mapping) and replies with a ``SharedMemoryRef`` to it; the client reads
it back through its own pool (``decode(msg, shared_memory=pool)``, one copy) before reusing the
room. A client whose call failed must not reuse the room (the server may still write it late).

**Mappings and shrinking segments (threat model).** Reads and writes go through ``mmap``: a
``memcpy`` instead of ``pread``/``pwrite`` (about 40 % less per byte on the benchmark's VM).
Touching a mapped page past the end of a segment that was shrunk (``ftruncate``) after it was
mapped raises SIGBUS, which would kill the process. Segments are created by
:class:`SharedMemoryPool` at their final size and never resized, so an honest peer never
shrinks one; every copy first checks the segment's *current* size (``fstat`` on the descriptor)
against ``offset + nbytes``, which turns a segment shrunk earlier (a stale or buggy peer) into
INVALID_ARGUMENT. What remains is a peer that truncates the segment *during* the copy, a
deliberate attack: segments are mode 0600, so that peer runs as the same user, which can
already signal or ptrace this process; the check does not defend against it.
The request checks that need no wire (:func:`~poegen.kernel.refusal.validate_finite`,
:func:`~poegen.kernel.refusal.validate_sigma`) live in :mod:`poegen.kernel.refusal`.

See DESIGN.md "The wire" and proto/poegen/v1/tensor.proto.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory as _shm
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from poegen.kernel.errors import ExpertError
from poegen.v1 import tensor_pb2

if os.name == "posix":
    import _posixshmem  # CPython's shm_open, as used by multiprocessing.shared_memory

#: Most dimensions a decoded tensor may have.
MAX_DIMS = 32
#: Hard cap on one tensor's byte size, whatever ``max_bytes`` says.
MAX_TENSOR_BYTES = 2**62
#: Prefix of every shared-memory segment poegen creates; the reader accepts nothing else.
SEGMENT_PREFIX = "poegen_"

_SEGMENT_NAME = re.compile(re.escape(SEGMENT_PREFIX) + r"[0-9a-f]{16,64}")
_ALIGN = 64  # byte alignment of tensors inside a segment
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
# Decoded tensors view read-only message bytes on purpose (module docstring), and torch warns
# (once per process) when it wraps one. The filter is set once, for calls from this module
# only: warnings.catch_warnings() around each call would swap the process-wide filter list
# from several worker threads at once, which is not thread-safe.
warnings.filterwarnings(
    "ignore", "The given NumPy array is not writable", UserWarning, module=__name__
)


@dataclass(frozen=True, slots=True)
class _Kind:
    """One wire dtype: its proto value, torch dtype, and numpy dtype of the wire bytes.

    ``carrier`` is the torch dtype with a numpy twin and the same itemsize that the bytes
    cross numpy as (bf16 travels as int16, bool as uint8).
    """

    proto: int
    name: str
    torch: torch.dtype
    wire: np.dtype
    carrier: torch.dtype


_KINDS = (
    _Kind(tensor_pb2.DTYPE_F32, "f32", torch.float32, np.dtype("<f4"), torch.float32),
    _Kind(tensor_pb2.DTYPE_F16, "f16", torch.float16, np.dtype("<f2"), torch.float16),
    _Kind(tensor_pb2.DTYPE_BF16, "bf16", torch.bfloat16, np.dtype("<i2"), torch.int16),
    _Kind(tensor_pb2.DTYPE_U8, "u8", torch.uint8, np.dtype("u1"), torch.uint8),
    _Kind(tensor_pb2.DTYPE_I64, "i64", torch.int64, np.dtype("<i8"), torch.int64),
    _Kind(tensor_pb2.DTYPE_BOOL, "bool", torch.bool, np.dtype("u1"), torch.uint8),
    _Kind(tensor_pb2.DTYPE_F64, "f64", torch.float64, np.dtype("<f8"), torch.float64),
)
_BY_PROTO = {k.proto: k for k in _KINDS}
_BY_TORCH = {k.torch: k for k in _KINDS}

#: torch dtypes that :func:`encode` accepts.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(k.torch for k in _KINDS)


# --------------------------------------------------------------------------- encode


def encode(t: torch.Tensor, *, shared_memory: SharedMemoryPool | None = None) -> tensor_pb2.Tensor:
    """``t`` as a ``poegen.v1.Tensor``: inline bytes, or a segment of ``shared_memory``.

    Any device and any strides (the bytes are those of ``t.contiguous()`` on the CPU). With a
    pool, tensors of at least ``pool.min_tensor_bytes`` go to shared memory when the pool has
    room, the rest inline. Raises ``TypeError`` for a dtype not in :data:`SUPPORTED_DTYPES`.
    """
    kind = _kind_of(t)
    arr = _wire_array(t, kind)
    msg = tensor_pb2.Tensor(dtype=kind.proto, shape=t.shape)  # type: ignore[arg-type]
    ref = shared_memory.put(arr) if shared_memory is not None else None
    if ref is not None:
        msg.shared_memory.CopyFrom(ref)
    else:
        msg.data = arr.tobytes()
    return msg


def encode_into(
    t: torch.Tensor, ref: tensor_pb2.SharedMemoryRef, peer: SharedMemoryReader, *, field: str
) -> tensor_pb2.Tensor:
    """``t`` written into a peer's reply room ``ref`` (see :meth:`SharedMemoryReader.write`);
    returns the ``Tensor`` that points at it. ``ExpertError`` on ``field`` for a bad room."""
    kind = _kind_of(t)
    arr = _wire_array(t, kind)
    peer.write(ref, arr, field=field)
    msg = tensor_pb2.Tensor(dtype=kind.proto, shape=t.shape)  # type: ignore[arg-type]
    msg.shared_memory.CopyFrom(ref)
    return msg


def _kind_of(t: torch.Tensor) -> _Kind:
    kind = _BY_TORCH.get(t.dtype)
    if kind is None:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"encode: dtype {t.dtype} cannot cross the wire (supported: {names})")
    return kind


class WireMessage:
    """A proto message plus tensors whose bytes are serialised straight from their memory.

    ``codec.encode`` builds ``bytes`` (one copy), protobuf copies them into the message (two)
    and serialising the request copies them again (three). A WireMessage sets only each
    tensor's header (``dtype``, ``shape``) in ``message`` and, in :meth:`SerializeToString`,
    appends the data as a second occurrence of the tensor field holding just ``data``: a parser
    merges the two occurrences of a message field (protobuf's rule for a repeated singular
    message field), so the bytes on the wire decode to exactly what ``encode`` would give, and
    the tensor's bytes are copied once, into the serialised message::

        request = WireMessage(pb.VelocityRequest(handle=h), {"x": x, "sigma": sigma})
        reply = rpcs["Velocity"](request)        # transport.unary_methods: any SerializeToString

    ``fields`` maps names of singular ``Tensor`` fields of ``message`` to tensors (any device,
    any strides). A CPU-contiguous tensor's memory is read when the message is serialised, not
    before: do not modify it in place until the call is sent. With ``shared_memory``, large
    tensors go to the pool as in :func:`encode`. ``message`` may still be changed (a handle)
    before serialising.
    """

    __slots__ = ("_raw", "message")

    def __init__(
        self,
        message: Any,
        fields: Mapping[str, torch.Tensor],
        *,
        shared_memory: SharedMemoryPool | None = None,
    ) -> None:
        self.message = message
        self._raw: list[tuple[bytes, np.ndarray]] = []
        for name, t in fields.items():
            descriptor = message.DESCRIPTOR.fields_by_name.get(name)
            if descriptor is None or descriptor.message_type is not tensor_pb2.Tensor.DESCRIPTOR:
                raise ValueError(f"{name}: not a Tensor field of {message.DESCRIPTOR.name}")
            kind = _kind_of(t)
            arr = _wire_array(t, kind)
            sub = getattr(message, name)
            sub.Clear()
            sub.dtype = kind.proto
            sub.shape.extend(t.shape)
            ref = shared_memory.put(arr) if shared_memory is not None else None
            if ref is not None:
                sub.shared_memory.CopyFrom(ref)
            else:
                self._raw.append((_varint(descriptor.number << 3 | 2), arr))

    def SerializeToString(self) -> bytes:
        """The message's bytes, tensor data appended (one copy of each tensor)."""
        parts: list[Any] = [self.message.SerializeToString()]
        for tag, arr in self._raw:
            head = _DATA_TAG + _varint(arr.nbytes)
            parts += (tag, _varint(len(head) + arr.nbytes), head, _byte_view(arr))
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Serialized:
    """A message already serialised (e.g. in a worker thread); gRPC sends ``data`` as is."""

    data: bytes

    def SerializeToString(self) -> bytes:
        return self.data


_DATA_TAG = bytes([3 << 3 | 2])  # Tensor.data: field 3, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _byte_view(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8))


def _wire_array(t: torch.Tensor, kind: _Kind) -> np.ndarray:
    """The elements of ``t`` as a C-contiguous numpy array in wire byte order."""
    host = t.detach().to(device="cpu").resolve_neg().contiguous()
    arr = host.view(kind.carrier).numpy()
    return arr if _LITTLE_ENDIAN_HOST else arr.astype(kind.wire)  # big-endian host: byteswap


# --------------------------------------------------------------------------- receive


_Message = TypeVar("_Message")


class Received(Generic[_Message]):
    """A parsed message whose top-level tensors kept their inline bytes where they arrived.

    ``message`` is the proto message with the ``data`` of those tensors left out (so upb
    neither copies them into its arena while parsing nor again on each ``.data`` access);
    ``inline`` maps each such field's name to a read-only view of its bytes in the received
    buffer. Attributes not defined here are the message's (``received.handle``,
    ``received.HasField("x")``). Read a tensor with :func:`decode_field`.
    """

    __slots__ = ("inline", "message")

    def __init__(self, message: _Message, inline: dict[str, memoryview]) -> None:
        self.message = message
        self.inline = inline

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def parser(message_type: Any) -> Callable[[bytes], Any]:
    """The gRPC deserializer of ``message_type``: :class:`Received` for a message with
    singular ``Tensor`` fields at its top level (see :func:`parse`), else ``FromString``."""
    tensors = {
        f.number: f.name
        for f in message_type.DESCRIPTOR.fields
        if f.message_type is tensor_pb2.Tensor.DESCRIPTOR and not f.is_repeated
    }
    if not tensors:
        return message_type.FromString
    return lambda buffer: parse(message_type, tensors, buffer)


def parse(message_type: Any, tensors: Mapping[int, str], buffer: bytes) -> Received:
    """``message_type.FromString(buffer)``, keeping the inline bytes of the ``tensors`` fields
    (number → name) in ``buffer``.

    Same result as protobuf's parser, field for field: the message is parsed from ``buffer``
    with only the ``Tensor.data`` entries of those fields cut out, every other byte in its
    place (so repeated occurrences still merge as protobuf merges them), and the field's
    bytes are those of its *last* ``data`` entry (the one protobuf keeps). A field with a
    ``shared_memory`` entry anywhere is left whole (its ``storage`` is decided by entry
    order), and a buffer this scanner does not understand (a group, a bad varint, a length
    past the end) is handed whole to protobuf, which accepts or refuses it as usual.
    """
    try:
        entries = list(_entries(buffer, 0, len(buffer)))
        cuts: dict[int, list[tuple[int, int]]] = {}  # tensor field → data entries (start, end)
        shared: set[int] = set()
        for number, wire_type, _, value, end in entries:
            if wire_type == 2 and number in tensors:
                for sub_number, sub_type, sub_start, _, sub_end in _entries(buffer, value, end):
                    if sub_number == 3 and sub_type == 2:
                        cuts.setdefault(number, []).append((sub_start, sub_end))
                    elif sub_number == 4:
                        shared.add(number)
    except _Unparsable:
        return Received(message_type.FromString(buffer), {})
    view = memoryview(buffer)
    parts: list[Any] = []
    inline: dict[str, memoryview] = {}
    for number, wire_type, start, value, end in entries:
        data = cuts.get(number) if number not in shared else None
        if not data or wire_type != 2:
            parts.append(view[start:end])
            continue
        kept = [(value, end)]  # the occurrence's body without its data entries
        for cut_start, cut_end in data:
            if value <= cut_start < end:
                kept[-1:] = [(kept[-1][0], cut_start), (cut_end, end)]
        body = b"".join(view[a:b] for a, b in kept)
        parts += (view[start : start + _varint_size(buffer, start)], _varint(len(body)), body)
        last_start, last_end = data[-1]
        head = _varint_size(buffer, last_start)  # the tag
        length_size = _varint_size(buffer, last_start + head)
        inline[tensors[number]] = view[last_start + head + length_size : last_end]
    return Received(message_type.FromString(b"".join(parts)), inline)


class _Unparsable(Exception):
    """A buffer :func:`parse` leaves to protobuf."""


def _read_varint(buffer: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < end and shift < 64:
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Unparsable


def _varint_size(buffer: bytes, pos: int) -> int:
    size = 1
    while buffer[pos + size - 1] >= 0x80:
        size += 1
    return size


def _entries(buffer: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, entry start, value start, entry end) of each entry."""
    while pos < end:
        start = pos
        tag, pos = _read_varint(buffer, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, after = _read_varint(buffer, pos, end)
        elif wire_type == 1:
            after = pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(buffer, pos, end)
            after = pos + length
        elif wire_type == 5:
            after = pos + 4
        else:  # groups (3, 4) and invalid wire types
            raise _Unparsable
        if number == 0 or after > end:
            raise _Unparsable
        yield number, wire_type, start, pos, after
        pos = after


def decode_field(
    message: Any,
    name: str,
    *,
    field: str | None = None,
    max_bytes: int | None = None,
    shared_memory: SharedMemorySource | None = None,
) -> torch.Tensor:
    """:func:`decode` of the tensor field ``name`` of ``message`` (a proto message or a
    :class:`Received`, whose kept bytes it views); errors name ``field`` (``name`` if None)."""
    inline = message.inline.get(name) if isinstance(message, Received) else None
    return decode(
        getattr(message, name),
        field=field or name,
        max_bytes=max_bytes,
        shared_memory=shared_memory,
        inline=inline,
    )


# --------------------------------------------------------------------------- decode


def checked_nbytes(
    shape: Sequence[int], itemsize: int, *, field: str, max_bytes: int | None = None
) -> int:
    """``prod(shape) * itemsize``, refused before anything is allocated when too large.

    Every prefix product (zero dimensions counted as 1, so an empty tensor with absurd
    dimensions is refused too) must stay within :data:`MAX_TENSOR_BYTES`, and the total within
    ``max_bytes``: RESOURCE_EXHAUSTED on ``"<field>.shape"``. Python integers: no overflow.
    """
    bound = itemsize
    for d in shape:
        bound *= max(int(d), 1)
        if bound > MAX_TENSOR_BYTES:
            raise ExpertError.resource_exhausted(
                f"{field}.shape", f"shape {list(shape)} is larger than 2**62 bytes"
            )
    nbytes = itemsize
    for d in shape:
        nbytes *= int(d)
    if max_bytes is not None and nbytes > max_bytes:
        raise ExpertError.resource_exhausted(
            f"{field}.shape",
            f"shape {list(shape)} needs {nbytes} bytes, over the limit of {max_bytes}",
        )
    return nbytes


def decode(
    msg: tensor_pb2.Tensor,
    *,
    field: str,
    max_bytes: int | None = None,
    shared_memory: SharedMemorySource | None = None,
    inline: memoryview | None = None,
) -> torch.Tensor:
    """The CPU tensor in ``msg``; validated first, ``ExpertError`` naming ``field`` otherwise.

    Inline data: a read-only-backed view of the message's bytes, no copy (see the module
    docstring); ``inline``, the tensor's bytes that :func:`parse` kept out of ``msg``, stands
    in for ``msg.data``. Shared memory (only with a ``shared_memory`` source: a
    :class:`SharedMemoryReader` for a peer's segments, or the :class:`SharedMemoryPool` whose
    room a reply was written to): a writable copy.
    ``max_bytes`` caps ``prod(shape) * itemsize`` (RESOURCE_EXHAUSTED above it).
    """
    kind = _BY_PROTO.get(msg.dtype)
    if kind is None:
        reason = (
            "dtype is DTYPE_UNSPECIFIED (is the tensor missing?)"
            if msg.dtype == tensor_pb2.DTYPE_UNSPECIFIED
            else f"unknown dtype {int(msg.dtype)}"
        )
        raise ExpertError.invalid(f"{field}.dtype", reason)
    shape = _checked_shape(msg, field)
    nbytes = checked_nbytes(shape, kind.wire.itemsize, field=field, max_bytes=max_bytes)
    if msg.WhichOneof("storage") == "shared_memory":
        if shared_memory is None:
            raise ExpertError.invalid(
                f"{field}.shared_memory", "shared-memory tensors are not enabled on this end"
            )
        raw = shared_memory.read(msg.shared_memory, nbytes, field=f"{field}.shared_memory")
        flat = raw.view(kind.wire)
    else:
        # upb: a fresh bytes object; the tensor below views it (or views the received buffer)
        data = msg.data if inline is None else inline
        if len(data) != nbytes:
            raise ExpertError.invalid(
                f"{field}.data",
                f"{len(data)} bytes, expected {nbytes} for shape {shape} of {kind.name}",
            )
        flat = np.frombuffer(data, dtype=kind.wire)
    return _to_torch(flat, shape, kind, field)


def _checked_shape(msg: tensor_pb2.Tensor, field: str) -> list[int]:
    if len(msg.shape) > MAX_DIMS:
        raise ExpertError.invalid(
            f"{field}.shape", f"{len(msg.shape)} dimensions, at most {MAX_DIMS}"
        )
    shape = list(msg.shape)
    for i, d in enumerate(shape):
        if d < 0:
            raise ExpertError.invalid(f"{field}.shape", f"dimension {i} is {d}, must be >= 0")
    return shape


def _to_torch(flat: np.ndarray, shape: list[int], kind: _Kind, field: str) -> torch.Tensor:
    if not _LITTLE_ENDIAN_HOST:
        flat = flat.astype(flat.dtype.newbyteorder("="))  # big-endian host: a swapped copy
    if kind.torch is torch.bool and flat.size and int(flat.max()) > 1:
        raise ExpertError.invalid(f"{field}.data", "bool elements must be 0 or 1")
    t = torch.from_numpy(flat)  # read-only-backed on purpose (its warning is filtered above)
    if kind.carrier is not kind.torch:
        t = t.view(kind.torch)
    return t.reshape(shape)


# --------------------------------------------------------------------------- validation


# --------------------------------------------------------------------------- shared memory


class SharedMemorySource(Protocol):
    """What :func:`decode` reads shared-memory tensors through."""

    def read(self, ref: tensor_pb2.SharedMemoryRef, nbytes: int, *, field: str) -> np.ndarray:
        """A private, writable uint8 copy of the ``nbytes`` bytes ``ref`` points at."""
        ...


class SharedMemoryPool:
    """Writer side of shared-memory tensors: segments reused across calls, unlinked on close.

    ``put`` copies a tensor's bytes into the current segment (64-byte aligned) and returns its
    ``SharedMemoryRef``; a tensor that does not fit goes to the next segment, a new one of
    ``max(segment_bytes, nbytes)`` if needed, as long as all segments stay within
    ``max_bytes`` (else ``put`` returns ``None`` and ``encode`` sends the tensor inline).
    Tensors under ``min_tensor_bytes`` always go inline.

    Lifetime: refs are valid until the RPC that carries them completes. Call :meth:`reset`
    once the replies of every call that carries refs from this pool have arrived; it makes
    all segments free for reuse. One pool per sequence of calls (concurrent calls: one pool
    each, or reset only when none is in flight)::

        with SharedMemoryPool() as pool:
            for sigma in levels:
                reply = await stub.Velocity(VelocityRequest(x=encode(x, shared_memory=pool), ...))
                pool.reset()

    Thread-safe. Segments are unlinked by :meth:`close`, the context manager, garbage
    collection of the pool, or (after a crash) Python's resource tracker.
    """

    def __init__(
        self,
        *,
        segment_bytes: int = 64 << 20,
        max_bytes: int = 4 << 30,
        min_tensor_bytes: int = 64 << 10,
    ) -> None:
        if segment_bytes <= 0 or max_bytes <= 0 or min_tensor_bytes < 1:
            raise ValueError("segment_bytes and max_bytes must be > 0, min_tensor_bytes >= 1")
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.min_tensor_bytes = min_tensor_bytes
        self._segments: list[_shm.SharedMemory] = []
        self._current = 0  # index of the segment being filled
        self._offset = 0  # first free byte in it
        self._fds: dict[str, int] = {}  # read-only descriptors of our segments (read())
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _unlink_all, self._segments, self._fds)

    @property
    def nbytes(self) -> int:
        """Total size of the segments held."""
        return sum(s.size for s in self._segments)

    def put(self, arr: np.ndarray) -> tensor_pb2.SharedMemoryRef | None:
        """Copy a C-contiguous array's bytes into a segment; ``None``: send it inline."""
        n = arr.nbytes
        if n < self.min_tensor_bytes:
            return None
        with self._lock:
            if self._closed:
                raise RuntimeError("SharedMemoryPool is closed")
            found = self._place(n)
            if found is None:
                return None
            segment, start = found
            segment.buf[start : start + n] = arr.reshape(-1).view(np.uint8)
            self._offset = start + n
            return tensor_pb2.SharedMemoryRef(name=segment.name, offset=start, nbytes=n)

    def _place(self, n: int) -> tuple[_shm.SharedMemory, int] | None:
        # Bump allocation: the current segment, then the next ones, then a new one.
        index, offset = self._current, self._offset
        while index < len(self._segments):
            start = -(-offset // _ALIGN) * _ALIGN
            if start + n <= self._segments[index].size:
                self._current = index
                return self._segments[index], start
            index, offset = index + 1, 0
        size = max(self.segment_bytes, n)
        if self.nbytes + size > self.max_bytes:
            return None  # state unchanged: smaller tensors may still fit
        name = SEGMENT_PREFIX + secrets.token_hex(8)
        self._segments.append(_shm.SharedMemory(name=name, create=True, size=size))
        self._current = len(self._segments) - 1
        return self._segments[-1], 0

    def reserve(self, nbytes: int) -> tensor_pb2.SharedMemoryRef | None:
        """Room for ``nbytes`` that a peer will write (a reply); ``None``: take it inline.

        Placed and limited as in :meth:`put` (``None`` under ``min_tensor_bytes`` or without
        room); valid, like a ref from ``put``, until :meth:`reset`. Read it back with
        :meth:`read` (``decode(..., shared_memory=pool)``) once the reply has arrived.
        """
        if nbytes < self.min_tensor_bytes:
            return None
        with self._lock:
            if self._closed:
                raise RuntimeError("SharedMemoryPool is closed")
            found = self._place(nbytes)
            if found is None:
                return None
            segment, start = found
            self._offset = start + nbytes
            return tensor_pb2.SharedMemoryRef(name=segment.name, offset=start, nbytes=nbytes)

    def read(self, ref: tensor_pb2.SharedMemoryRef, nbytes: int, *, field: str) -> np.ndarray:
        """A private, writable uint8 copy of ``nbytes`` bytes at ``ref`` in one of our segments.

        For replies a peer wrote into room from :meth:`reserve`: one copy from our mapping,
        after checking the segment's current size (``fstat``), so a segment the peer truncated
        gives an error, not a crash (see the module docstring). Errors name ``field``, never
        the segment.
        """
        if ref.nbytes != nbytes:
            raise ExpertError.invalid(
                f"{field}.nbytes", f"{ref.nbytes} bytes, expected {nbytes} for the shape"
            )
        with self._lock:
            segment = next((s for s in self._segments if s.name == ref.name), None)
            if self._closed or segment is None:
                raise ExpertError.invalid(f"{field}.name", "not a segment of this pool")
            if ref.offset < 0 or ref.offset + nbytes > segment.size:
                raise ExpertError.invalid(f"{field}.offset", "offset + nbytes is past the segment")
            fd = self._fds.get(segment.name)
            if fd is None:
                fd = self._fds[segment.name] = _posixshmem.shm_open(
                    "/" + segment.name, os.O_RDONLY, mode=0
                )
            if ref.offset + nbytes > os.fstat(fd).st_size:  # shrunk since we made it
                raise ExpertError.invalid(f"{field}.offset", "offset + nbytes is past the segment")
            return np.frombuffer(segment.buf, np.uint8, nbytes, ref.offset).copy()

    def reset(self) -> None:
        """Make every segment free again; refs handed out before become invalid."""
        with self._lock:
            self._current, self._offset = 0, 0

    def close(self) -> None:
        """Unlink every segment (idempotent); ``put`` raises afterwards."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> SharedMemoryPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _unlink_all(segments: list[_shm.SharedMemory], fds: dict[str, int]) -> None:
    while fds:
        os.close(fds.popitem()[1])
    for segment in segments:
        segment.close()
        with contextlib.suppress(FileNotFoundError):  # someone else unlinked it
            segment.unlink()
    segments.clear()


class SharedMemoryReader:
    """Reader side of shared-memory tensors: opens and maps segments read-only, copies bytes
    out; and the writer of replies into rooms its peers offer (:meth:`check_room`,
    :meth:`write`, through descriptors opened and mapped read-write, kept apart from the
    read-only ones). Every copy checks the segment's current size first (module docstring).

    Keeps at most ``max_segments`` segments open (least recently used closed first). Only
    names ``poegen_<hex>`` are opened. :meth:`read` is what :func:`decode` calls; its errors
    name ``field`` (``"x.shared_memory.name"``, ``".offset"``, ``".nbytes"``) and never the
    segment. POSIX only (``shm_open``); thread-safe.
    """

    def __init__(self, *, max_segments: int = 16) -> None:
        if os.name != "posix":
            raise NotImplementedError("shared-memory tensors need a POSIX host")
        if max_segments < 1:
            raise ValueError("max_segments must be >= 1")
        self.max_segments = max_segments
        self._fds: OrderedDict[str, _Mapped] = OrderedDict()
        self._writable: OrderedDict[str, _Mapped] = OrderedDict()  # reply rooms (write())
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_fds, self._fds, self._writable)

    def read(self, ref: tensor_pb2.SharedMemoryRef, nbytes: int, *, field: str) -> np.ndarray:
        """A private, writable uint8 copy of the ``nbytes`` bytes that ``ref`` points at."""
        if not _SEGMENT_NAME.fullmatch(ref.name):
            raise ExpertError.invalid(f"{field}.name", "not a poegen shared-memory segment")
        if ref.nbytes != nbytes:
            raise ExpertError.invalid(
                f"{field}.nbytes", f"{ref.nbytes} bytes, expected {nbytes} for the shape"
            )
        if ref.offset < 0:
            raise ExpertError.invalid(f"{field}.offset", f"{ref.offset}, must be >= 0")
        with self._lock:
            segment = self._open(ref.name, field, self._fds, os.O_RDONLY)
            return segment.view(ref.offset, nbytes, field).copy()

    def check_room(self, ref: tensor_pb2.SharedMemoryRef, nbytes: int, *, field: str) -> None:
        """Refuse, before any work, a reply room a :meth:`write` of ``nbytes`` could not fill.

        INVALID_ARGUMENT on ``"<field>.name"`` (not ``poegen_<hex>``, or not openable for
        writing), ``".nbytes"`` (not ``nbytes``) or ``".offset"`` (negative, or past the end).
        """
        with self._lock:
            self._room(ref, nbytes, field)

    def write(self, ref: tensor_pb2.SharedMemoryRef, arr: np.ndarray, *, field: str) -> None:
        """Copy a C-contiguous array's bytes into a peer's reply room ``ref`` (one ``memcpy``).

        Checked as in :meth:`check_room` (again: the peer owns the segment), and the segment's
        size again just before the copy (a truncated room is an error, not a crash).
        """
        src = arr.reshape(-1).view(np.uint8)
        with self._lock:
            segment = self._room(ref, src.nbytes, field)
            np.copyto(segment.view(ref.offset, src.nbytes, field), src)

    def _room(self, ref: tensor_pb2.SharedMemoryRef, nbytes: int, field: str) -> _Mapped:
        if not _SEGMENT_NAME.fullmatch(ref.name):
            raise ExpertError.invalid(f"{field}.name", "not a poegen shared-memory segment")
        if ref.nbytes != nbytes:
            raise ExpertError.invalid(
                f"{field}.nbytes", f"{ref.nbytes} bytes, expected {nbytes} for the reply"
            )
        if ref.offset < 0:
            raise ExpertError.invalid(f"{field}.offset", f"{ref.offset}, must be >= 0")
        segment = self._open(ref.name, field, self._writable, os.O_RDWR)
        segment.check(ref.offset, nbytes, field)
        return segment

    def _open(self, name: str, field: str, cache: OrderedDict[str, _Mapped], flags: int) -> _Mapped:
        segment = cache.get(name)
        if segment is not None:
            cache.move_to_end(name)
            return segment
        try:
            fd = _posixshmem.shm_open("/" + name, flags, mode=0)
        except OSError:
            raise ExpertError.invalid(f"{field}.name", "the segment cannot be opened") from None
        segment = cache[name] = _Mapped(fd, writable=flags == os.O_RDWR)
        while len(cache) > self.max_segments:
            cache.popitem(last=False)[1].close()
        return segment

    def close(self) -> None:
        """Close every open segment (idempotent)."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> SharedMemoryReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Mapped:
    """A peer's segment: its descriptor and a mapping of it, made on first use."""

    __slots__ = ("fd", "map", "writable")

    def __init__(self, fd: int, *, writable: bool) -> None:
        self.fd = fd
        self.writable = writable
        self.map: mmap.mmap | None = None

    def check(self, offset: int, nbytes: int, field: str) -> int:
        """The segment's current size; INVALID_ARGUMENT if ``offset + nbytes`` is past it."""
        size = os.fstat(self.fd).st_size
        if offset + nbytes > size:
            raise ExpertError.invalid(f"{field}.offset", "offset + nbytes is past the segment")
        return size

    def view(self, offset: int, nbytes: int, field: str) -> np.ndarray:
        """uint8 view of ``nbytes`` at ``offset``, checked against the segment's current size
        just before it is returned. Callers copy through it under the reader's lock and drop
        it there (a live view keeps the mapping from being closed)."""
        size = self.check(offset, nbytes, field)
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        if self.map is None or len(self.map) < offset + nbytes:
            self.close_map()
            access = mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ
            self.map = mmap.mmap(self.fd, size, access=access)
        return np.frombuffer(self.map, np.uint8, nbytes, offset)

    def close_map(self) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):  # a view still alive: GC unmaps it later
                self.map.close()
            self.map = None

    def close(self) -> None:
        self.close_map()
        os.close(self.fd)


def _close_fds(*caches: OrderedDict[str, _Mapped]) -> None:
    for segments in caches:
        while segments:
            segments.popitem()[1].close()


__all__ = [
    "MAX_DIMS",
    "MAX_TENSOR_BYTES",
    "SEGMENT_PREFIX",
    "SUPPORTED_DTYPES",
    "Received",
    "Serialized",
    "SharedMemoryPool",
    "SharedMemoryReader",
    "SharedMemorySource",
    "WireMessage",
    "checked_nbytes",
    "decode",
    "decode_field",
    "encode",
    "encode_into",
    "parse",
    "parser",
]
