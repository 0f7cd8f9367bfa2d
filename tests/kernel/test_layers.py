"""The layers, read from the source (every ``import``, also those inside functions):

* the kernel's math (the loop, transitions, moves, weights, the target, the experts' protocol)
  imports nothing of the wire: no gRPC, no protobuf, no generated code, none of the kernel's
  transport modules (codec, errors, remote, service, transport);
* the kernel imports nothing from the expert servers or the clients;
* ``refusal`` (the refusal type and the request checks) is wire-free too: both sides use it;
* the model adapters (every expert-server module outside the host, ``expert_servers/server``,
  plus the adapter protocol and backend registry in it) import nothing of the wire either: they
  refuse a request with ``refusal.ExpertError``, and the host maps it to a gRPC status.

(import-linter cannot see poegen's packages: they are mapped from folders of other names by
``package-dir``, which its graph builder does not follow; the same contracts are checked here.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[2] / "kernel"
MATH = (
    "calls", "coupling", "crop", "experts", "mcmc", "particles", "path", "potentials", "problem", "sampler",
    "schedule", "spec", "target", "transition",
)  # fmt: skip
WIRE = (
    "grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.protobuf", "google.rpc",
    "poegen.v1", "poegen.kernel.codec", "poegen.kernel.errors", "poegen.kernel.remote",
    "poegen.kernel.jobs", "poegen.kernel.replicas", "poegen.kernel.service", "poegen.kernel.service_metrics", "poegen.kernel.tracing",
    "poegen.kernel.transport",
)  # fmt: skip
PLAIN = ("refusal",)  # wire-free, not the sampler's math: the refusal type and request checks
OUTSIDE = ("poegen.expert_servers", "poegen.clients", "poegen.bench")
EXPERT_SERVERS = KERNEL.parent / "expert_servers"
HOST = EXPERT_SERVERS / "server"
ADAPTER_SIDE_OF_THE_HOST = ("adapter.py", "backends.py")


def imported(path: Path, package: str = "poegen.kernel") -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against
    ``package``, the package ``path`` is in)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", MATH + PLAIN)
def test_the_kernels_math_imports_no_wire(module):
    bad = sorted(n for n in imported(KERNEL / f"{module}.py") if _within(n, WIRE + OUTSIDE))
    assert not bad, f"poegen.kernel.{module} imports {bad}"


def test_the_kernel_imports_no_server_and_no_client():
    bad = {
        path.name: sorted(n for n in imported(path) if _within(n, OUTSIDE))
        for path in sorted(KERNEL.glob("*.py"))
    }
    assert not {k: v for k, v in bad.items() if v}


def test_every_kernel_module_is_placed_in_a_layer():
    """A new module must be put on one side: math (listed in MATH) or wire."""
    modules = {p.stem for p in KERNEL.glob("*.py")} - {"__init__"}
    wire = {n.rsplit(".", 1)[1] for n in WIRE if n.startswith("poegen.kernel.")}
    assert modules == set(MATH) | set(PLAIN) | wire


def _adapter_modules() -> list[Path]:
    return sorted(
        path
        for path in EXPERT_SERVERS.rglob("*.py")
        if HOST not in path.parents or path.name in ADAPTER_SIDE_OF_THE_HOST
    )


@pytest.mark.parametrize(
    "path", _adapter_modules(), ids=lambda p: str(p.relative_to(EXPERT_SERVERS))
)
def test_the_model_adapters_import_no_wire(path):
    """Adapters import no gRPC, protobuf or generated code, no wire module of the kernel, and
    nothing of the host but its adapter protocol and backend registry."""
    relative = path.relative_to(EXPERT_SERVERS).with_suffix("")
    parts = ["poegen", "expert_servers", *relative.parts]
    package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
    package = package.removesuffix(".__init__")
    host_wire = tuple(
        f"poegen.expert_servers.server.{p.stem}"
        for p in HOST.glob("*.py")
        if p.name not in (*ADAPTER_SIDE_OF_THE_HOST, "__init__.py")
    )
    bad = sorted(
        n
        for n in imported(path, package)
        if _within(n, WIRE + host_wire) or n == "poegen.expert_servers.server"
    )
    assert not bad, f"{relative} imports {bad}"


def test_the_benchmarks_provenance_names_the_same_math():
    """bench/provenance.py stamps results with the math modules listed here."""
    from poegen.bench import provenance

    assert tuple(f"kernel/{m}.py" for m in MATH) == provenance.KERNEL_MATH


def test_the_check_sees_an_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from grpc import StatusCode\n    from . import codec\n")
    names = imported(source)
    assert _within("grpc.StatusCode", WIRE) and "grpc" in names
    assert "poegen.kernel.codec" in names


def test_importing_every_model_adapter_loads_no_grpc():
    """The same, at run time: the packages' ``__init__`` files pull in no host either."""
    modules = []
    for path in _adapter_modules():
        parts = [
            "poegen",
            "expert_servers",
            *path.relative_to(EXPERT_SERVERS).with_suffix("").parts,
        ]
        modules.append(".".join(parts).removesuffix(".__init__"))
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "wire = ('grpc', 'google.protobuf', 'poegen.v1')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in wire or m.startswith(wire)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
