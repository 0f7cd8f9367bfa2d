"""The wire contract: documented, named by buf's rules, and its generated code in sync.

The .proto files are parsed by protoc (``--include_source_info``), so "has a leading comment"
means exactly what buf's COMMENTS rules mean. ``buf lint`` itself runs here when
``npm ci`` has installed it, and always in CI (scripts/check_proto.sh).
"""

from __future__ import annotations

import importlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from helpers.timing import scaled

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
SOURCES = sorted((PROTO_ROOT / "poegen" / "v1").glob("*.proto"))
STEMS = [p.stem for p in SOURCES]
BUF = ROOT / "node_modules" / ".bin" / "buf"


def _protoc(*args: str) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in SOURCES]
    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args, *files])
    assert code == 0, f"protoc failed with {code}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    _protoc("--include_source_info", f"--descriptor_set_out={out}")
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def _elements(f: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    """(source path, readable name) of every element buf's COMMENTS rules check."""

    def enum(path, e):
        yield path, f"enum {e.name}"
        for i, v in enumerate(e.value):
            yield (*path, 2, i), f"value {e.name}.{v.name}"

    def message(path, m):
        if m.options.map_entry:  # synthetic map<,> entry: no source of its own
            return
        yield path, f"message {m.name}"
        for i, fld in enumerate(m.field):
            yield (*path, 2, i), f"field {m.name}.{fld.name}"
        synthetic = {fld.oneof_index for fld in m.field if fld.proto3_optional}
        for i, o in enumerate(m.oneof_decl):
            if i not in synthetic:  # `optional` makes a hidden oneof; buf skips it too
                yield (*path, 8, i), f"oneof {m.name}.{o.name}"
        for i, nested in enumerate(m.nested_type):
            yield from message((*path, 3, i), nested)
        for i, e in enumerate(m.enum_type):
            yield from enum((*path, 4, i), e)

    for i, m in enumerate(f.message_type):
        yield from message((4, i), m)
    for i, e in enumerate(f.enum_type):
        yield from enum((5, i), e)
    for i, s in enumerate(f.service):
        yield (6, i), f"service {s.name}"
        for j, rpc in enumerate(s.method):
            yield (6, i, 2, j), f"rpc {s.name}.{rpc.name}"


def test_every_element_has_a_leading_comment(files):
    missing = []
    for f in files:
        comments = {tuple(loc.path): loc.leading_comments for loc in f.source_code_info.location}
        elements = list(_elements(f))
        assert elements, f.name
        missing += [
            f"{f.name}: {name}" for path, name in elements if not comments.get(path, "").strip()
        ]
    assert not missing, "no leading comment:\n" + "\n".join(missing)


def test_names_follow_buf_standard(files):
    for f in files:
        assert f.package == "poegen.v1"
        enums = list(f.enum_type) + [e for m in f.message_type for e in m.enum_type]
        for e in enums:
            assert e.value[0].number == 0 and e.value[0].name.endswith("_UNSPECIFIED"), e.name
        for s in f.service:
            assert s.name.endswith("Service"), s.name
            for rpc in s.method:
                assert rpc.input_type == f".poegen.v1.{rpc.name}Request", rpc.name
                assert rpc.output_type == f".poegen.v1.{rpc.name}Response", rpc.name


def test_generated_code_is_importable():
    for stem in STEMS:
        module = importlib.import_module(f"poegen.v1.{stem}_pb2")
        assert module.DESCRIPTOR.package == "poegen.v1"
        importlib.import_module(f"poegen.v1.{stem}_pb2_grpc")
        assert (PROTO_ROOT / "poegen" / "v1" / f"{stem}_pb2.pyi").is_file()
    grpc_modules = [
        importlib.import_module(f"poegen.v1.{s}_pb2_grpc") for s in ("expert", "sampler")
    ]
    assert grpc_modules[0].ExpertServiceStub and grpc_modules[1].SamplerServiceStub


def test_generated_code_matches_the_protos(tmp_path):
    # the same command as scripts/gen_proto.sh, into a scratch directory
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc wrote nothing"
    stale = [
        str(p) for p in generated if (tmp_path / p).read_bytes() != (PROTO_ROOT / p).read_bytes()
    ]
    assert not stale, f"run scripts/gen_proto.sh; stale: {stale}"


def test_buf_lint():
    # scripts/test.sh installs buf (npm ci) before the suite runs: its absence is a failure
    assert BUF.exists(), f"buf is not installed at {BUF}: run npm ci (scripts/test.sh does)"
    result = subprocess.run(
        [str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=scaled(120)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wire_settings_mirror_the_kernel_settings():
    """Every SamplerSettings field of the kernel travels on the wire, and nothing else does."""
    from poegen.kernel.spec import SamplerSettings
    from poegen.v1 import sampler_pb2

    wire = {f.name for f in sampler_pb2.SamplerSettings.DESCRIPTOR.fields} - {"preset"}
    assert wire == set(SamplerSettings.model_fields)
