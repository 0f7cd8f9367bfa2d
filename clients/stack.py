"""A local stack: every expert server and the Sampler service as separate processes.

A *stack file* lists the expert servers to start and the Sampler's settings::

    # stack.yaml
    experts:
      - name: ring                       # the endpoint's name (unique)
        backend: analytic                # `poegen serve analytic`
        config: experts/ring.yaml        # an expert file, relative to this stack file
      - name: bar
        backend: analytic
        expert: gaussian_mixture         # or the expert file inline: expert + params
        params: {means: [[0, 0]], covariances: [[0.01, 0.33]], weights: [1]}
      - name: flux
        backend: flux                    # any backend of `poegen serve` (entry points)
        model: /models/flux-tiny         # a folder (relative to this file) or hub id
        options: {dtype: float32}        # --option key=value
        startup_timeout_s: 600           # loading a large model takes a while
    sampler:                             # SamplerServerConfig fields; `sampler: null`: none
      max_jobs: 2
    env: {OMP_NUM_THREADS: "1"}          # every process's environment (an expert's env wins)

Many small servers on few cores run faster single-threaded (``OMP_NUM_THREADS: "1"``: torch's
OpenMP threads of several processes otherwise compete for the same cores; the T1 demo's jobs
take about half as long); a large model on a many-core machine wants its threads.

Each process is ``python -m poegen.clients.cli serve …`` or ``… sampler`` on port 0 (unless a
port is given); the stack reads the ``poegen: serving NAME on HOST:PORT`` line each prints,
then waits until its gRPC health service answers SERVING (an expert loading its model is
NOT_SERVING until the load is done). Python API::

    from poegen.clients.stack import LocalStack

    with LocalStack.from_yaml("stack.yaml") as stack:     # starts all, waits for health
        print(stack.endpoints.sampler)                    # "127.0.0.1:40123"
        print(stack.endpoints.experts["ring"])            # "127.0.0.1:40119"
        ...                                               # use them (Client, poegen generate)
    # every process is stopped here, also after an exception or Ctrl-C

or ``stack = LocalStack.from_yaml(path); stack.start(); ...; stack.stop()``. A stack can also be
built in code: ``LocalStack(StackConfig(experts=[ExpertProcess(name=..., ...)]))``.

No orphans. Each child leads its own process group (``process_group=0``), so a Ctrl-C in the
terminal reaches only the parent, which stops the children in order: SIGTERM to each group (the
servers drain and exit 0), then SIGKILL to any group still alive after ``stop_timeout_s``.
Children also watch their parent (``POEGEN_PARENT_PID``, see
:func:`poegen.expert_servers.server.cli.stop_with_parent`): if the parent dies without
stopping them (SIGKILL), they stop themselves within a second.

Errors: :class:`StackError` names the process and quotes the last lines of its stderr (a
server that exits before listening, a health check that times out). The children's stderr
goes to ``log_dir/NAME.log`` when a ``log_dir`` is given, else it is kept in memory (the last
200 lines) for error messages.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from poegen.clients.files import load_model_file, resolve, validate_model

logger = logging.getLogger(__name__)

_ANNOUNCE = re.compile(r"^poegen: serving (\S+) on (\S+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PARENT_ENV = "POEGEN_PARENT_PID"


class ExpertProcess(BaseModel):
    """One expert server of a stack (``poegen serve BACKEND …``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="endpoint name, unique in the stack")
    backend: str = Field("analytic", description="a backend of `poegen serve`")
    config: Path | None = Field(None, description="analytic: expert file (YAML)")
    expert: str | None = Field(None, description="analytic: inline expert entry-point name")
    params: dict[str, Any] = Field(default_factory=dict, description="analytic: its parameters")
    max_batch: int | None = Field(None, ge=1, description="analytic inline: largest batch")
    latent_space: str = Field("", description="analytic inline: latent space name")
    model: str | None = Field(
        None, description="model folder (relative to the stack file) or hub id (--model)"
    )
    model_root: Path | None = Field(None, description="--model-root")
    options: dict[str, str] = Field(default_factory=dict, description="--option key=value")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(0, ge=0, le=65535, description="bind port; 0 picks a free one")
    grace_s: float = Field(1.0, ge=0, description="drain time on shutdown")
    args: list[str] = Field(default_factory=list, description="extra flags of `poegen serve`")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment")
    startup_timeout_s: float = Field(120.0, gt=0, description="listening and SERVING within")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("letters, digits, '_', '.', '-' (at most 64), not starting with '-'")
        return name

    @field_validator("config", "model_root")
    @classmethod
    def _resolve(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else resolve(path, info.context)

    @field_validator("model")
    @classmethod
    def _resolve_folder(cls, model: str | None, info: ValidationInfo) -> str | None:
        """A relative path that exists from the stack file's folder becomes absolute;
        anything else (a hub id, an absolute path) is passed unchanged."""
        if model is None or Path(model).expanduser().is_absolute():
            return model
        folder = resolve(model, info.context)
        return str(folder.resolve()) if folder.exists() else model

    @field_validator("options", mode="before")
    @classmethod
    def _stringify(cls, options: Any) -> Any:
        if isinstance(options, Mapping):
            return {
                str(k): str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in options.items()
            }
        return options

    @model_validator(mode="after")
    def _check_source(self) -> ExpertProcess:
        if self.backend == "analytic":
            if self.model is not None:
                raise ValueError("model: analytic experts take config or expert, not model")
            if self.config is not None and self.expert is not None:
                raise ValueError("expert: give config or an inline expert, not both")
        elif self.config is not None or self.expert is not None:
            raise ValueError(f"config: backend {self.backend!r} takes model, not config/expert")
        return self


class StackConfig(BaseModel):
    """A stack file (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: list[ExpertProcess] = Field(default_factory=list)
    sampler: dict[str, Any] | None = Field(
        default_factory=dict, description="SamplerServerConfig fields; null: no sampler"
    )
    stop_timeout_s: float = Field(15.0, gt=0, description="SIGTERM → SIGKILL after this long")
    env: dict[str, str] = Field(
        default_factory=dict, description="environment of every process (each expert's own wins)"
    )

    @field_validator("sampler")
    @classmethod
    def _check_sampler(cls, sampler: dict[str, Any] | None) -> dict[str, Any] | None:
        if sampler is None:
            return None
        from poegen.kernel.service import SamplerServerConfig

        SamplerServerConfig.model_validate(sampler)  # errors carry the field's path
        return sampler

    @model_validator(mode="after")
    def _unique(self) -> StackConfig:
        names = [e.name for e in self.experts]
        for i, name in enumerate(names):
            if name in names[:i] or name == "sampler":
                raise ValueError(f"experts[{i}].name: {name!r} is used twice (or is 'sampler')")
        if not self.experts and self.sampler is None:
            raise ValueError("experts: a stack needs at least one process")
        return self


@dataclass(frozen=True, slots=True)
class StackEndpoints:
    """Where a started stack listens: ``host:port`` per expert name, and the Sampler's."""

    sampler: str | None
    experts: dict[str, str]

    def address(self, name: str) -> str:
        """The address of ``name`` (an expert or ``"sampler"``); KeyError naming the known."""
        if name == "sampler" and self.sampler is not None:
            return self.sampler
        if name in self.experts:
            return self.experts[name]
        known = ", ".join([*self.experts, *(["sampler"] if self.sampler else [])])
        raise KeyError(f"no endpoint {name!r} in the stack (known: {known})")


class StackError(RuntimeError):
    """A process of the stack failed to start or died; the message names it."""


@dataclass(eq=False)
class StackProcess:
    """One running child: its name, command, process, address once announced."""

    name: str
    command: list[str]
    proc: subprocess.Popen[str]
    timeout_s: float
    address: str | None = None
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=200)
    )
    announced: threading.Event = field(default_factory=threading.Event)
    _readers: list[threading.Thread] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 8) -> str:
        return "\n".join(list(self.stderr_tail)[-lines:])


class LocalStack:
    """Starts, watches and stops a stack's processes (see the module docstring)."""

    def __init__(
        self,
        config: StackConfig,
        *,
        python: str = sys.executable,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.python = python
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.processes: list[StackProcess] = []
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._started = False

    @classmethod
    def from_yaml(cls, path: Path | str, **kwargs: Any) -> LocalStack:
        """A stack from a stack file (``SpecError`` naming the failing path)."""
        return cls(load_model_file(StackConfig, path), **kwargs)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, base_dir: Path | None = None, **kwargs: Any
    ) -> LocalStack:
        """A stack from a mapping, relative paths resolved against ``base_dir``."""
        return cls(validate_model(StackConfig, data, source="stack", base_dir=base_dir), **kwargs)

    # ----------------------------------------------------------------------- life cycle

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> StackEndpoints:
        """The addresses (after :meth:`start`)."""
        experts = {p.name: p.address for p in self.processes if p.name != "sampler"}
        sampler = next((p.address for p in self.processes if p.name == "sampler"), None)
        if not self._started or None in experts.values():
            raise StackError("the stack is not started")
        return StackEndpoints(sampler, experts)  # type: ignore[arg-type]

    def start(self) -> StackEndpoints:
        """Start every process at once, wait for each to listen and be SERVING.

        On any failure every process is stopped and :class:`StackError` raised.
        """
        if self.processes:
            raise StackError("the stack is already started")
        self._workdir = tempfile.TemporaryDirectory(prefix="poegen-stack-")
        try:
            for spec in self.config.experts:
                self._spawn(spec.name, self._expert_command(spec), spec.env, spec.startup_timeout_s)
            if self.config.sampler is not None:
                self._spawn("sampler", self._sampler_command(), {}, 120.0)
            for process in self.processes:
                self._await_ready(process)
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self.endpoints

    def stop(self) -> dict[str, int]:
        """SIGTERM every process group, SIGKILL those left after ``stop_timeout_s``.

        Returns the exit status of each process (negative: killed by that signal).
        """
        for process in self.processes:
            _signal_group(process.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        codes: dict[str, int] = {}
        for process in self.processes:
            try:
                codes[process.name] = process.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time: SIGKILL", process.name)
                _signal_group(process.proc, signal.SIGKILL)
                codes[process.name] = process.proc.wait()
            _signal_group(process.proc, signal.SIGKILL)  # anything the child left behind
            for reader in process._readers:
                reader.join(timeout=2)
        self.processes = []
        self._started = False
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return codes

    def wait(self, timeout: float | None = None) -> tuple[str, int] | None:
        """Block until a process exits (its name and status) or ``timeout`` passes (None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            for process in self.processes:
                code = process.proc.poll()
                if code is not None:
                    return process.name, code
            time.sleep(0.2)
        return None

    def describe_failure(self, name: str) -> str:
        """The last stderr lines of process ``name``."""
        for process in self.processes:
            if process.name == name:
                return process.tail()
        return ""

    # ----------------------------------------------------------------------- commands

    def _cli(self) -> list[str]:
        return [self.python, "-m", "poegen.clients.cli"]

    def _expert_command(self, spec: ExpertProcess) -> list[str]:
        cmd = [*self._cli(), "serve", spec.backend, "--host", spec.host, "--port", str(spec.port)]
        cmd += ["--grace", str(spec.grace_s)]
        if spec.backend == "analytic":
            config = spec.config
            if spec.expert is not None:
                config = self._write(f"{spec.name}.yaml", _inline_expert(spec))
            if config is not None:
                cmd += ["--config", str(config)]
        if spec.model is not None:
            cmd += ["--model", spec.model]
        if spec.model_root is not None:
            cmd += ["--model-root", str(spec.model_root)]
        for key, value in spec.options.items():
            cmd += ["--option", f"{key}={value}"]
        return [*cmd, *spec.args]

    def _sampler_command(self) -> list[str]:
        settings = {"grace_s": 1.0, **(self.config.sampler or {})}
        config = self._write("sampler.yaml", {"sampler": settings})
        return [*self._cli(), "sampler", "--config", str(config)]

    def _write(self, name: str, data: Mapping[str, Any]) -> Path:
        assert self._workdir is not None
        path = Path(self._workdir.name) / name
        path.write_text(yaml.safe_dump(dict(data)))
        return path

    # ----------------------------------------------------------------------- processes

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str], timeout: float) -> None:
        full_env = {
            **os.environ,
            **self.config.env,
            **self.env,
            **env,
            "PYTHONUNBUFFERED": "1",
            PARENT_ENV: str(os.getpid()),
        }
        logger.debug("starting %s: %s", name, " ".join(command))
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            process_group=0,  # its own group: the terminal's Ctrl-C reaches only us
        )
        process = StackProcess(name, command, proc, timeout)
        self.processes.append(process)
        log = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = (self.log_dir / f"{name}.log").open("w")
        process._readers = [
            threading.Thread(target=_read_stdout, args=(process,), daemon=True),
            threading.Thread(target=_read_stderr, args=(process, log), daemon=True),
        ]
        for reader in process._readers:
            reader.start()

    def _await_ready(self, process: StackProcess) -> None:
        deadline = time.monotonic() + process.timeout_s
        while not process.announced.wait(0.1):
            if process.proc.poll() is not None:
                process._readers[1].join(timeout=2)
                raise StackError(
                    f"{process.name} exited with status {process.proc.returncode} before "
                    f"listening:\n{process.tail()}"
                )
            if time.monotonic() > deadline:
                raise StackError(f"{process.name} did not listen within {process.timeout_s:.0f} s")
        assert process.address is not None
        if not wait_serving(
            process.address, deadline=deadline, alive=lambda: process.proc.poll() is None
        ):
            if process.proc.poll() is not None:
                raise StackError(f"{process.name} exited while loading:\n{process.tail()}")
            raise StackError(
                f"{process.name} at {process.address} was not SERVING within "
                f"{process.timeout_s:.0f} s:\n{process.tail()}"
            )


def wait_serving(
    address: str, *, deadline: float, alive: Any = lambda: True, service: str = ""
) -> bool:
    """Poll the standard health service at ``address`` until SERVING (True) or the deadline."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and alive():
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return False


def _inline_expert(spec: ExpertProcess) -> dict[str, Any]:
    data: dict[str, Any] = {"expert": spec.expert, "params": spec.params}
    if spec.max_batch is not None:
        data["max_batch"] = spec.max_batch
    if spec.latent_space:
        data["latent_space"] = spec.latent_space
    return data


def _read_stdout(process: StackProcess) -> None:
    assert process.proc.stdout is not None
    for line in process.proc.stdout:
        match = _ANNOUNCE.match(line.strip())
        if match and not process.announced.is_set():
            process.address = match.group(2)
            process.announced.set()


def _read_stderr(process: StackProcess, log: Any) -> None:
    assert process.proc.stderr is not None
    try:
        for line in process.proc.stderr:
            process.stderr_tail.append(line.rstrip("\n"))
            if log is not None:
                log.write(line)
                log.flush()
    finally:
        if log is not None:
            log.close()


def _signal_group(proc: subprocess.Popen[str], sig: int) -> None:
    """Send ``sig`` to the child's process group (pgid = its pid); a group gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def group_members(pgid: int) -> list[int]:
    """Pids of live processes in process group ``pgid`` (read from /proc; Linux)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def stack_summary(stack: LocalStack) -> list[tuple[str, str, int]]:
    """(name, address, pid) per process, in start order."""
    return [(p.name, p.address or "", p.pid) for p in stack.processes]


__all__ = [
    "PARENT_ENV",
    "ExpertProcess",
    "LocalStack",
    "StackConfig",
    "StackEndpoints",
    "StackError",
    "StackProcess",
    "group_members",
    "stack_summary",
    "wait_serving",
]
