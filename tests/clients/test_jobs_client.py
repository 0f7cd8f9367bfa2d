"""Jobs by id from the SDK and the CLI, against a real Sampler and expert on loopback: ids,
status, list, cancel, attach, detach, and a stream re-attached across a Sampler restart."""

from __future__ import annotations

import json
import shlex
import threading
from pathlib import Path

import pytest
import torch
from helpers.docs import docs_section
from helpers.remote import LoopThread, free_port, wait_until
from helpers.server import start_process
from helpers.server_experts import Gaussian
from helpers.timing import scaled

from poegen import Client, GenerationError, GenerationResult, JobInfo, SpecBuilder
from poegen.clients.cli import main
from poegen.kernel.service import SamplerServerConfig


def _spec(address: str, steps: int = 12, seed: int = 4):
    return (
        SpecBuilder(seed=seed).expert(address)
        .settings(num_particles=16, num_steps=steps, mcmc_steps=1).build()
    )  # fmt: skip


def _same(a: GenerationResult, b: GenerationResult) -> None:
    assert torch.equal(a.particles, b.particles) and torch.equal(a.log_weights, b.log_weights)
    assert a.log_evidence == b.log_evidence and a.best_index == b.best_index


def test_the_sdk_names_lists_attaches_and_cancels_jobs(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    sampler = loop.sampler()
    with Client(sampler.address) as client:
        result = client.generate(_spec(expert.address), job_id="first", timeout=scaled(60))
        assert result.job_id == "first"
        info = client.job("first")
        assert isinstance(info, JobInfo) and info.state == "succeeded"
        assert info.levels_done == info.levels == len(result.trace) and info.error is None
        again = list(client.attach("first"))
        assert len(again) == 1 and again[0].job_id == "first"
        _same(again[0], result)
        anonymous = client.generate(_spec(expert.address), timeout=scaled(60))
        assert len(anonymous.job_id) == 32
        # detached: the client leaves after one level, the job runs on, attach follows it
        events = client.stream(_spec(expert.address, steps=400), job_id="long", detach=True)
        next(events)
        events.close()
        assert client.job("long").state == "running"
        states = [j.state for j in client.jobs()]
        assert states[0] == "running" and states[1:] == ["succeeded"] * 2
        cancelled = client.cancel("long")
        assert cancelled.state == "cancelled"
        with pytest.raises(GenerationError) as caught:
            list(client.attach("long"))
        assert caught.value.field == "job_id" and caught.value.code.name == "CANCELLED"
        with pytest.raises(GenerationError) as unknown:
            client.job("nope")
        assert unknown.value.code.name == "NOT_FOUND" and unknown.value.field == "job_id"


def test_leaving_a_stream_cancels_the_job_unless_detached(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    sampler = loop.sampler()
    with Client(sampler.address) as client:
        events = client.stream(_spec(expert.address, steps=400), job_id="left")
        next(events)
        events.close()
        assert wait_until(lambda: client.job("left").state == "cancelled", timeout=scaled(10))


def test_a_stream_is_re_attached_across_a_sampler_restart(loop: LoopThread, tmp_path: Path):
    """The Sampler stops mid-job (no grace) and starts again on the same port and store; the
    client's one ``generate`` call re-attaches and returns the uninterrupted result."""
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    config = SamplerServerConfig(port=free_port(), job_store=tmp_path / "jobs")
    first = loop.sampler(config)
    address = first.address
    with Client(address) as client:
        whole = client.generate(_spec(expert.address, steps=40), timeout=scaled(60))
    restarted = threading.Event()
    second = []

    def restart() -> None:
        loop.stop(first.host)  # grace 0: the job stops after a level, resumable
        second.append(loop.sampler(config))  # same port and store: resumes before serving
        restarted.set()

    def on_progress(event) -> None:
        if event.step == 3 and not restarted.is_set():
            threading.Thread(target=restart, daemon=True).start()

    with Client(address, reattach_s=scaled(30)) as client:
        result = client.generate(
            _spec(expert.address, steps=40), job_id="survivor", on_progress=on_progress,
            timeout=scaled(60),
        )  # fmt: skip
        info = client.job("survivor")
    assert restarted.is_set() and info.resumes == 1
    _same(result, whole)
    assert len(result.trace) < len(whole.trace)  # the levels run while away are not in it
    with Client(address) as client, pytest.raises(GenerationError) as caught:
        # without reattach_s, the same break fails the call
        stopping = threading.Thread(target=loop.stop, args=(second[0].host,), daemon=True)
        for event in client.stream(_spec(expert.address, steps=400)):
            if event.step == 1:
                stopping.start()
    assert caught.value.code.name == "UNAVAILABLE" and "shutting down" in caught.value.reason


def test_the_cli_lists_shows_cancels_and_attaches_jobs(loop: LoopThread, tmp_path, capsys):
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    sampler = loop.sampler()
    with Client(sampler.address) as client:
        client.generate(_spec(expert.address), job_id="done", timeout=scaled(60))
        events = client.stream(_spec(expert.address, steps=400), job_id="busy", detach=True)
        next(events)
        events.close()
    capsys.readouterr()
    at = ["--sampler", sampler.address]
    assert main(["job", "list", *at, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["job_id"], j["state"]) for j in listed] == [
        ("busy", "running"),
        ("done", "succeeded"),
    ]
    assert main(["job", "status", "done", *at]) == 0
    assert capsys.readouterr().out.startswith("done succeeded (")
    assert main(["job", "attach", "done", *at, "-o", str(tmp_path / "out")]) == 0
    written = capsys.readouterr().out.split()
    assert str(tmp_path / "out" / "particles.safetensors") in written
    assert main(["job", "cancel", "busy", *at]) == 0
    assert capsys.readouterr().out.startswith("busy cancelled (")
    assert main(["job", "attach", "busy", *at]) == 1  # a cancelled job has no result
    assert "busy" in capsys.readouterr().err
    assert main(["job", "status", "nope", *at]) == 1


@pytest.mark.parametrize("command", ["list", "status", "cancel", "attach"])
def test_every_job_command_has_help_with_an_example(command, capsys):
    assert main(["job", command, "--help"]) == 0
    assert "Example" in capsys.readouterr().out


def test_the_commands_of_the_docs_jobs_section_run_as_written(loop: LoopThread, tmp_path, capsys):
    """docs/cli.md, "Jobs by id": the Sampler command as a process (its port and folder made
    free), then each `poegen job` command against a job made by the SDK."""
    commands = docs_section("Jobs by id: checkpoints, restarts, `poegen job`", "cli.md")
    assert commands[0].startswith("poegen sampler ") and len(commands) == 5
    port = str(free_port())
    store = tmp_path / "jobs"

    def as_run(command: str) -> list[str]:
        command = command.replace("50050", port).replace("~/poegen-jobs", str(store))
        command = command.replace("out/cats", str(tmp_path / "cats"))
        return shlex.split(command)[1:]

    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    sampler = start_process(["-m", "poegen.clients.cli", *as_run(commands[0])])
    try:
        with Client(f"127.0.0.1:{port}") as client:
            client.generate(_spec(expert.address, steps=20), job_id="cats-42", timeout=60)
        capsys.readouterr()
        for command in commands[1:]:
            assert main(as_run(command)) == 0, command
        out = capsys.readouterr().out
        assert "cats-42" in out and '"state": "succeeded"' in out
        assert (tmp_path / "cats" / "particles.safetensors").is_file()
        assert (store / "cats-42" / "result").is_file()  # the folder the docs named
    finally:
        sampler.stop()
