"""The layers, read from the source (every ``import``, also those inside functions):

* the kernel's math (the loop, transitions, moves, weights, the target, the experts' protocol)
  imports nothing of the wire: no gRPC, no protobuf, no generated code, none of the kernel's
  transport modules (codec, errors, remote, service, transport);
* the kernel imports nothing from the expert servers or the clients.

(import-linter cannot see poegen's packages: they are mapped from folders of other names by
``package-dir``, which its graph builder does not follow; the same contracts are checked here.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[2] / "kernel"
MATH = (
    "calls", "crop", "experts", "mcmc", "particles", "path", "potentials", "problem", "sampler",
    "schedule", "spec", "target", "transition",
)  # fmt: skip
WIRE = (
    "grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.protobuf", "google.rpc",
    "poegen.v1", "poegen.kernel.codec", "poegen.kernel.errors", "poegen.kernel.remote",
    "poegen.kernel.jobs", "poegen.kernel.replicas", "poegen.kernel.service", "poegen.kernel.service_metrics", "poegen.kernel.tracing",
    "poegen.kernel.transport",
)  # fmt: skip
OUTSIDE = ("poegen.expert_servers", "poegen.clients", "poegen.bench")


def imported(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    names: set[str] = set()
    package = "poegen.kernel"
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


@pytest.mark.parametrize("module", MATH)
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
    assert modules == set(MATH) | wire


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
