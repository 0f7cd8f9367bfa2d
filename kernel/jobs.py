"""Where the Sampler keeps its jobs: requests, statuses, per-level checkpoints, results.

A :class:`JobStore` holds a few named records per job id, each one opaque bytes in a safe
format: ``request`` and ``result`` (``GenerateRequest`` / ``GenerateResult`` in protobuf's
binary encoding), ``status`` (a ``JobStatus``) and ``checkpoint`` (safetensors, see
:func:`encode_checkpoint`). The service writes the checkpoint after every finished level,
so a Sampler that restarts on the same store goes on with each unfinished job from its
last level (``poegen.kernel.service``), and the resumed job's result equals the
uninterrupted one bit for bit.

Two stores: :class:`DirectoryJobStore` (the default of ``poegen sampler``: one folder per
job, every record written to a temporary file and renamed over the old one, so a kill
leaves either the old record or the new, never half of one; a lock file keeps a second
Sampler off the same folder) and :class:`MemoryJobStore` (ids, statuses and results for
the life of the process; nothing survives it). An object store plugs in by implementing
the five methods of :class:`JobStore` over its put/get/list/delete.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from poegen.kernel.mcmc import TargetEval
from poegen.kernel.sampler import Checkpoint

JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
RECORDS = ("request", "status", "checkpoint", "result")
_FORMAT = "poegen-checkpoint-1"
_EVAL_FIELDS = ("score", "log_prob", "velocity", "log_rate", "tie_log_prob")


class JobStoreError(RuntimeError):
    """A store that cannot be used (locked by another Sampler, unreadable records)."""


class JobStore:
    """Named records per job id (see the module docstring); thread-safe."""

    durable = False  # whether records outlive the process (checkpoints are worth writing)

    def put(self, job_id: str, record: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, job_id: str, record: str) -> bytes | None:
        """The record, or None when the job has none (or is unknown)."""
        raise NotImplementedError

    def discard(self, job_id: str, record: str) -> None:
        """Drop one record of a job (no error when absent)."""
        raise NotImplementedError

    def delete(self, job_id: str) -> None:
        """Drop the job and all its records (no error when absent)."""
        raise NotImplementedError

    def job_ids(self) -> list[str]:
        """The ids of the stored jobs, oldest first."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the store (its lock)."""


class MemoryJobStore(JobStore):
    """Records in this process's memory."""

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, job_id: str, record: str, data: bytes) -> None:
        _check(job_id, record)
        with self._lock:
            self._jobs.setdefault(job_id, {})[record] = bytes(data)

    def get(self, job_id: str, record: str) -> bytes | None:
        with self._lock:
            return self._jobs.get(job_id, {}).get(record)

    def discard(self, job_id: str, record: str) -> None:
        with self._lock:
            self._jobs.get(job_id, {}).pop(record, None)

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def job_ids(self) -> list[str]:
        with self._lock:
            return list(self._jobs)


class DirectoryJobStore(JobStore):
    """One folder per job under ``root``, one file per record, written atomically.

    Raises :class:`JobStoreError` when another process holds the store's lock.
    """

    durable = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise JobStoreError(
                f"job store {self.root}: another Sampler uses it (one Sampler per store)"
            ) from None
        self._lock = threading.Lock()

    def _folder(self, job_id: str) -> Path:
        return self.root / job_id

    def put(self, job_id: str, record: str, data: bytes) -> None:
        _check(job_id, record)
        folder = self._folder(job_id)
        folder.mkdir(exist_ok=True)
        partial = folder / f".{record}.partial"
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, folder / record)  # atomic: the old record or the new one

    def get(self, job_id: str, record: str) -> bytes | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            return (self._folder(job_id) / record).read_bytes()
        except FileNotFoundError:
            return None

    def discard(self, job_id: str, record: str) -> None:
        if JOB_ID.fullmatch(job_id):
            (self._folder(job_id) / record).unlink(missing_ok=True)

    def delete(self, job_id: str) -> None:
        if JOB_ID.fullmatch(job_id):
            shutil.rmtree(self._folder(job_id), ignore_errors=True)

    def job_ids(self) -> list[str]:
        folders = [p for p in self.root.iterdir() if p.is_dir() and JOB_ID.fullmatch(p.name)]
        return [p.name for p in sorted(folders, key=lambda p: (p.stat().st_mtime_ns, p.name))]

    def close(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()


def _check(job_id: str, record: str) -> None:
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r}: 1 to 64 of [A-Za-z0-9._-]")
    if record not in RECORDS:
        raise ValueError(f"record {record!r}: one of {', '.join(RECORDS)}")


# --------------------------------------------------------------------------- checkpoints


def encode_checkpoint(checkpoint: Checkpoint, revisions: Sequence[Sequence[str]]) -> bytes:
    """safetensors bytes of a checkpoint and each factor's revisions seen so far.

    Tensors keep their dtype; floats go in the metadata in hex (``float.hex``: exact).
    """
    tensors = {
        "x": checkpoint.x,
        "log_w": checkpoint.log_w,
        "potential": checkpoint.potential,
        "generator_state": checkpoint.generator_state,
    }
    for name in _EVAL_FIELDS:
        value = getattr(checkpoint.here, name)
        if value is not None:
            tensors[f"here.{name}"] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "format": _FORMAT,
        "levels_done": str(checkpoint.levels_done),
        "log_z": float(checkpoint.log_z).hex(),
        "scale": float(checkpoint.scale).hex(),
        "step_scale": float(checkpoint.step_scale).hex(),
        "revisions": json.dumps([list(r) for r in revisions]),
    }
    return save_tensors(tensors, metadata=metadata)


def decode_checkpoint(data: bytes) -> tuple[Checkpoint, list[list[str]]]:
    """The checkpoint and revisions :func:`encode_checkpoint` wrote; JobStoreError otherwise."""
    try:
        tensors = load_tensors(data)
        metadata = _metadata(data)
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {_FORMAT!r}")
        here = TargetEval(**{name: tensors.get(f"here.{name}") for name in _EVAL_FIELDS})
        checkpoint = Checkpoint(
            levels_done=int(metadata["levels_done"]),
            x=tensors["x"],
            here=here,
            log_w=tensors["log_w"],
            potential=tensors["potential"],
            log_z=float.fromhex(metadata["log_z"]),
            scale=float.fromhex(metadata["scale"]),
            step_scale=float.fromhex(metadata["step_scale"]),
            generator_state=tensors["generator_state"],
        )
        revisions = [[str(r) for r in rs] for rs in json.loads(metadata["revisions"])]
    except Exception as e:  # safetensors, JSON, a missing key: the same unreadable record
        raise JobStoreError(f"unreadable checkpoint ({type(e).__name__}: {e})") from None
    return checkpoint, revisions


def _metadata(data: bytes) -> Mapping[str, str]:
    """The safetensors header's ``__metadata__`` (``load`` returns only the tensors)."""
    size = int.from_bytes(data[:8], "little")
    if not 0 < size <= len(data) - 8:
        raise ValueError("truncated header")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {})


__all__ = [
    "JOB_ID",
    "DirectoryJobStore",
    "JobStore",
    "JobStoreError",
    "MemoryJobStore",
    "decode_checkpoint",
    "encode_checkpoint",
]
