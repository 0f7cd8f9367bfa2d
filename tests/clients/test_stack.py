"""LocalStack and ``poegen up``: real processes, health, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers.stack import BAR, MIX, REPO, alive, stack_processes, wait_gone
from helpers.timing import scaled

from poegen.clients.endpoints import health
from poegen.clients.files import SpecError
from poegen.clients.stack import LocalStack, StackError, group_members


def _write_stack(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _small_stack(tmp_path: Path, *, two_experts: bool = False) -> Path:
    """An expert from a file (relative to the stack file), maybe one inline, and a Sampler."""
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "mix.yaml").write_text(
        yaml.safe_dump({"expert": "gaussian_mixture", "params": MIX})
    )
    experts: list[dict] = [{"name": "mix", "config": "experts/mix.yaml"}]
    if two_experts:
        experts.append({"name": "bar", "expert": "gaussian_mixture", "params": BAR})
    return _write_stack(tmp_path, {"experts": experts, "sampler": {"max_jobs": 1}})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_then_a_signal_stops_every_process(tmp_path: Path, sig: int) -> None:
    stack_file = _small_stack(tmp_path)
    stderr = tmp_path / "up.stderr"  # a file, not a pipe nobody reads; shown on failure
    with stderr.open("w") as err:
        up = subprocess.Popen(
            [sys.executable, "-m", "poegen.clients.cli", "up", str(stack_file)],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            process_group=0,  # like a shell job: Ctrl-C goes to this group only
        )
    try:
        # two servers start at once; each imports torch (about 5 s idle, 10-30 s loaded)
        processes = stack_processes(up, scaled(120))
        assert set(processes) == {"mix", "sampler"}
        for address, pid in processes.values():
            assert alive(pid)
            assert health(address) == "SERVING"
        os.killpg(up.pid, sig)  # the terminal's Ctrl-C, or a service manager's SIGTERM
        signalled = time.monotonic()
        try:
            code = up.wait(timeout=scaled(30))  # measured: 0.5 s idle, 3-6 s with 4 CPU hogs
        except subprocess.TimeoutExpired:
            raise AssertionError(f"poegen up still running {scaled(30):.0f} s after the "
                                 f"signal; stderr:\n{stderr.read_text()}") from None  # fmt: skip
        assert code == 0, f"after {time.monotonic() - signalled:.1f} s: {stderr.read_text()}"
        pids = [pid for _, pid in processes.values()]
        assert wait_gone(pids, timeout=scaled(5)) == []
        assert all(group_members(pid) == [] for pid in pids)  # each child led its own group
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def _kill_the_parent_and_wait_for_its_children(stack_file: Path, count: int) -> list[int]:
    """Start ``stack_file`` from a parent process, SIGKILL the parent: the children left."""
    script = textwrap.dedent(
        f"""
        import time
        from poegen.clients.stack import LocalStack
        stack = LocalStack.from_yaml({str(stack_file)!r})
        stack.start()
        print(" ".join(str(p.pid) for p in stack.processes), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == count and all(alive(p) for p in pids)
        parent.kill()
        parent.wait()
        return wait_gone(pids, timeout=scaled(30))
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_parent_killed_outright_leaves_no_orphan_expert(tmp_path: Path) -> None:
    """The fast form of the test below: one expert server, no Sampler (one torch import)."""
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"expert": "gaussian_mixture", "params": MIX}))  # fmt: skip
    stack_file = _write_stack(
        tmp_path, {"experts": [{"name": "mix", "config": "mix.yaml"}], "sampler": None}
    )
    assert _kill_the_parent_and_wait_for_its_children(stack_file, 1) == []


@pytest.mark.slow  # a second line of defence; `poegen up` under SIGINT/SIGTERM is the main one
def test_a_parent_killed_outright_leaves_no_orphan(tmp_path: Path) -> None:
    """SIGKILL gives the parent no chance to stop the stack: the children notice and stop."""
    assert _kill_the_parent_and_wait_for_its_children(_small_stack(tmp_path), 2) == []


def test_a_server_that_fails_to_start_is_named_with_its_error(tmp_path: Path) -> None:
    stack = LocalStack.from_mapping(
        {
            "experts": [
                {"name": "good", "expert": "gaussian_mixture", "params": MIX},
                {"name": "broken", "expert": "no_such_expert"},
            ],
            "sampler": None,
        }
    )
    with pytest.raises(StackError, match=r"broken exited with status 2[\s\S]*no_such_expert"):
        stack.start()
    assert stack.processes == []  # the good one was stopped too


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (
            {"experts": [{"name": "a", "expert": "x"}, {"name": "b", "port": 70000}]},
            "experts[1].port",
        ),
        ({"experts": [{"name": "a", "expert": "x", "model": "m"}]}, "experts[0]"),
        (
            {"experts": [{"name": "a", "expert": "x"}], "sampler": {"max_jobs": 0}},
            "sampler.max_jobs",
        ),
        ({"experts": [{"name": "-a", "expert": "x"}]}, "experts[0].name"),
        ({"experts": [{"name": "a", "expert": "x"}], "extra": 1}, "extra"),
    ],
)
def test_stack_file_errors_name_the_path(tmp_path: Path, data: dict, path: str) -> None:
    with pytest.raises(SpecError) as error:
        LocalStack.from_yaml(_write_stack(tmp_path, data))
    assert any(p == path or p.startswith(path) for p in error.value.paths), error.value
    assert str(tmp_path / "stack.yaml") in str(error.value)
