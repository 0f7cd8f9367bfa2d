"""The SDK against a real local stack: sync and async clients, streams, cancellation, outputs."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers.remote import LoopThread
from helpers.stack import BAR, MIX, REPO, REWARD, SETTINGS, spec_data, stack_data, write_models
from helpers.timing import scaled

from poegen import (
    AsyncClient,
    Client,
    GenerationError,
    GenerationResult,
    GenerationSpec,
    GenerationTimeout,
    LocalStack,
    ProgressEvent,
    SpecBuilder,
    SpecError,
    write_outputs,
)
from poegen.clients.endpoints import health
from poegen.expert_servers.analytic import GaussianMixture, LinearReward
from poegen.kernel import Factor, SamplerSettings, sample

LONG = {"num_particles": 256, "num_steps": 5000, "mcmc_steps": 5}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    models = tmp_path_factory.mktemp("models")
    write_models(models)
    with LocalStack.from_mapping(stack_data(models)) as running:
        yield running


@pytest.fixture(scope="module")
def pixels() -> Iterator[dict[str, str]]:
    """Pixel-space analytic experts (an image and a video shape) served in this process."""
    loop = LoopThread()
    image = GaussianMixture(
        torch.full((1, 192), 0.5), torch.full((1, 192), 0.01), [1.0], sample_shape=(3, 8, 8)
    )
    video = GaussianMixture(
        torch.linspace(-0.8, 0.8, 768)[None], torch.full((1, 768), 0.01), [1.0],
        sample_shape=(3, 4, 8, 8),
    )  # fmt: skip
    try:
        yield {"image": loop.serve(image).address, "video": loop.serve(video).address}
    finally:
        loop.close()


def _spec(**overrides) -> GenerationSpec:
    return GenerationSpec.from_mapping(spec_data(**overrides))


def _local_reference(seed: int = 3, settings: dict | None = None):
    factors = [
        Factor(GaussianMixture(**MIX)),
        Factor(GaussianMixture(**BAR)),
        Factor(LinearReward(**REWARD), weight=2.0),
    ]
    return sample(
        factors,
        (2,),
        SamplerSettings(**(settings or SETTINGS)),
        generator=torch.Generator().manual_seed(seed),
    )


def _free_slots(client: Client, within_s: float = scaled(10.0)) -> None:
    """Two jobs at once succeed within seconds: the Sampler (max_jobs 2) runs nothing left
    over (a job that was not cancelled would run for minutes and hold a slot)."""
    spec = _spec()
    deadline = time.monotonic() + within_s
    while True:
        try:
            with ThreadPoolExecutor(2) as pool:
                results = list(
                    pool.map(lambda _: client.generate(spec, timeout=scaled(60)), range(2))
                )
            break
        except GenerationError as e:
            if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the cancelled job's thread is still finishing its expert call
    assert all(r.particles.shape == (32, 2) for r in results)


def test_the_stack_serves_every_endpoint(stack: LocalStack) -> None:
    endpoints = stack.endpoints
    assert set(endpoints.experts) == {"mix", "bar", "right"}
    assert all(health(a) == "SERVING" for a in [*endpoints.experts.values(), endpoints.sampler])
    assert health(endpoints.sampler, service="poegen.v1.SamplerService") == "SERVING"
    assert endpoints.address("sampler") == endpoints.sampler
    with pytest.raises(KeyError, match="known: mix, bar, right, sampler"):
        endpoints.address("nope")
    with Client.from_stack(stack) as client:
        info = client.describe("mix")  # an endpoint name, or an address
    assert (info.name, info.kind, info.sample_shape) == ("mix", "generative", (2,))


def test_generate_through_the_sampler_equals_the_kernel_in_process(stack: LocalStack) -> None:
    with Client.from_stack(stack) as client:
        result = client.generate(_spec(), timeout=scaled(60))
    local = _local_reference()
    assert torch.equal(result.particles, local.particles)
    torch.testing.assert_close(result.log_weights, local.log_weights.to(torch.float64))
    assert result.best_index == local.best_index
    assert result.transition == local.transition == "euler"  # "auto": 32 particles < 32·2
    assert [r.name for r in result.experts] == ["mix", "bar", "right"]
    assert len(result.trace) == len(local.trace)
    torch.testing.assert_close(result.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert 1.0 <= result.ess <= 32.0
    assert result.images == () and result.video is None  # 2-D samples: nothing to decode


def test_a_job_on_the_fk_transition_over_the_wire_equals_the_kernel(stack: LocalStack) -> None:
    """64 particles for 2 coordinates: "auto" takes FK (with its control drift) in the Sampler
    as in the kernel, bit for bit, and the result says so."""
    settings = SETTINGS | {"num_particles": 64}
    with Client.from_stack(stack) as client:
        result = client.generate(_spec(settings=settings), timeout=scaled(60))
    local = _local_reference(settings=settings)
    assert result.transition == local.transition == "fk"
    assert torch.equal(result.particles, local.particles)
    assert torch.equal(result.log_weights, local.log_weights.to(torch.float64))
    assert result.log_evidence == local.log_evidence


def test_in_process_mode_gives_the_same_particles(stack: LocalStack) -> None:
    with Client.from_stack(stack, in_process=True) as client:
        assert client.sampler is None
        result = client.generate(_spec(), timeout=scaled(60))
    assert torch.equal(result.particles, _local_reference().particles)
    assert result.transition == "euler"
    assert [r.name for r in result.experts] == ["mix", "bar", "right"]


def test_stream_events_arrive_in_order_then_the_result(stack: LocalStack) -> None:
    spec = _spec()
    with Client.from_stack(stack) as client:
        events = list(client.stream(spec, timeout=scaled(60)))
    *levels, result = events
    assert isinstance(result, GenerationResult)
    assert all(isinstance(e, ProgressEvent) for e in levels)
    assert [e.step for e in levels] == list(range(len(levels)))
    assert len(levels) == spec.total_levels() == levels[0].total
    sigmas = [e.sigma for e in levels]
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    assert all(0 < e.ess <= 1 for e in levels)
    elapsed = [e.elapsed_s for e in levels]
    assert elapsed == sorted(elapsed)
    assert levels[-1].eta_s == 0.0
    assert result.trace == tuple(levels)
    assert set(levels[0].timings) == {"mix", "bar", "right"}


def test_previews_ride_on_the_events_when_asked(stack: LocalStack) -> None:
    with Client.from_stack(stack) as client:
        with_previews = list(client.stream(_spec(preview=True), timeout=scaled(60)))[:-1]
        without = list(client.stream(_spec(), timeout=scaled(60)))[:-1]
    assert all(e.preview is not None and e.preview.shape == (2,) for e in with_previews)
    assert all(e.preview is None for e in without)


def test_async_client_generates_and_streams(stack: LocalStack) -> None:
    async def body() -> tuple[GenerationResult, list[int]]:
        async with AsyncClient.from_stack(stack) as client:
            result = await client.generate(_spec(), timeout=scaled(60))
            steps = [e.step async for e in client.stream(_spec()) if isinstance(e, ProgressEvent)]
            return result, steps

    result, steps = asyncio.run(body())
    assert torch.equal(result.particles, _local_reference().particles)
    assert steps == list(range(len(steps)))


def test_cancelling_the_task_cancels_the_job_on_the_sampler(stack: LocalStack) -> None:
    seen = []

    async def body() -> None:
        async with AsyncClient.from_stack(stack) as client:

            async def consume() -> None:
                async for event in client.stream(_spec(settings=LONG)):
                    seen.append(event)

            task = asyncio.ensure_future(consume())
            while not seen:
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(body())
    with Client.from_stack(stack) as client:
        _free_slots(client)  # a job still running would take one of the two slots


def test_timeout_raises_and_cancels_the_job(stack: LocalStack) -> None:
    # timeout=1.0 is the subject, not a limit (not scaled): LONG runs for minutes
    with Client.from_stack(stack) as client:
        with pytest.raises(GenerationTimeout, match="timeout"):
            client.generate(_spec(settings=LONG), timeout=1.0)
        with pytest.raises(TimeoutError):  # GenerationTimeout is a TimeoutError
            client.generate(_spec(settings=LONG), timeout=1.0)
        _free_slots(client)


def test_in_process_timeout_stops_the_kernel(stack: LocalStack) -> None:
    # timeout=1.0 is the subject, not a limit (not scaled)
    with Client.from_stack(stack, in_process=True) as client, pytest.raises(GenerationTimeout):
        client.generate(_spec(settings=LONG), timeout=1.0)


_CTRL_C_CLIENT = """
import json, sys
from poegen import Client, GenerationSpec

sampler, endpoints, spec, timeout = sys.argv[1:]
def progress(event):
    if event.step == 0:
        print("level 0", flush=True)  # the job runs and this process waits in generate()
with Client(sampler, endpoints=json.loads(endpoints)) as client:
    try:
        client.generate(
            GenerationSpec.from_mapping(json.loads(spec)), timeout=float(timeout),
            on_progress=progress,
        )
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(0)
print("finished", flush=True)
"""


def test_ctrl_c_in_the_blocking_client_cancels_the_job(stack: LocalStack) -> None:
    """Ctrl-C (SIGINT to the process) while ``generate`` waits: KeyboardInterrupt at once, the
    job cancelled on the Sampler. A client process of its own, signalled only once it streams
    the first level, so the signal lands inside the blocking wait, as a user's Ctrl-C does."""
    job_timeout = scaled(120)  # LONG runs for minutes; this bounds a client that missed Ctrl-C
    endpoints = stack.endpoints
    child = subprocess.Popen(
        [
            sys.executable, "-c", _CTRL_C_CLIENT, endpoints.sampler,
            json.dumps(endpoints.experts), json.dumps(spec_data(settings=LONG)), str(job_timeout),
        ],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "level 0"
        signalled = time.monotonic()
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=job_timeout) == 0
        latency = time.monotonic() - signalled
        assert child.stdout.read().strip() == "interrupted"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert latency < job_timeout / 4  # it stopped at the signal, not at the job's timeout
    with Client.from_stack(stack) as client:
        _free_slots(client)


def test_a_sigint_taken_by_another_thread_still_interrupts_the_blocking_client(
    stack: LocalStack,
) -> None:
    """A process-directed SIGINT goes to any thread that does not block it; Python raises
    KeyboardInterrupt in the main thread only when that thread runs. Here the client's own
    loop thread takes it (as on a loaded machine, where the bug was seen): the blocking wait
    still raises, within its polling interval rather than when the job ends."""
    assert threading.current_thread() is threading.main_thread()
    job_timeout = scaled(60)
    signalled: list[float] = []

    def progress(event: ProgressEvent) -> None:  # on the client's loop thread
        if not signalled:
            signalled.append(time.monotonic())
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    with Client.from_stack(stack) as client:
        with pytest.raises(KeyboardInterrupt):
            client.generate(_spec(settings=LONG), timeout=job_timeout, on_progress=progress)
        latency = time.monotonic() - signalled[0]
        assert latency < job_timeout / 4  # before the fix: the whole job_timeout
        _free_slots(client)


def test_leaving_a_stream_early_cancels_the_job(stack: LocalStack) -> None:
    with Client.from_stack(stack) as client:
        for event in client.stream(_spec(settings=LONG)):
            assert isinstance(event, ProgressEvent)
            break
        _free_slots(client)


@pytest.mark.parametrize("in_process", [False, True])
def test_a_bad_address_names_the_spec_field(stack: LocalStack, in_process: bool) -> None:
    spec = _spec(experts=[{"endpoint": "mix"}, {"address": "127.0.0.1:1", "name": "gone"}])
    with (
        Client.from_stack(stack, in_process=in_process) as client,
        pytest.raises(GenerationError) as error,
    ):
        client.generate(spec, timeout=scaled(60))
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert error.value.spec_field == "experts[1].address"
    assert "experts[1].address" in str(error.value)


def test_an_unknown_endpoint_name_is_a_spec_error(stack: LocalStack) -> None:
    spec = _spec(experts=[{"endpoint": "nope"}])
    with Client.from_stack(stack) as client, pytest.raises(SpecError) as error:
        client.generate(spec)
    assert error.value.paths == ("experts[0].endpoint",)
    assert "known: mix, bar, right" in str(error.value)


def test_builder_spec_runs(stack: LocalStack) -> None:
    spec = (
        SpecBuilder(seed=3)
        .expert(endpoint="mix")
        .expert(endpoint="bar")
        .expert(endpoint="right", weight=2.0)
        .settings(**SETTINGS)
        .build()
    )
    with Client.from_stack(stack) as client:
        result = client.generate(spec, timeout=scaled(60))
    assert torch.equal(result.particles, _local_reference().particles)


def test_pixel_samples_become_images_and_outputs(
    stack: LocalStack, pixels: dict[str, str], tmp_path: Path
) -> None:
    spec = GenerationSpec.from_mapping(
        {
            "settings": {"num_particles": 6, "num_steps": 4, "mcmc_steps": 0},
            "experts": [{"address": pixels["image"], "name": "image"}],
            "output": {"samples": 4},
        }
    )
    with Client.from_stack(stack) as client:
        result = client.generate(spec, timeout=scaled(60))
    assert result.sample_shape == (3, 8, 8)  # from the expert's Describe
    assert len(result.images) == 4 and result.images[0].size == (8, 8)
    weights = result.weights[list(result.image_indices)]
    assert torch.all(weights[:-1] >= weights[1:])  # highest weight first
    first = torch.from_numpy(np.asarray(result.images[0])).permute(2, 0, 1).float()
    expected = result.particles[result.image_indices[0]].clamp(-1, 1).add(1).mul(127.5).round()
    assert torch.equal(first, expected)
    written = write_outputs(result, tmp_path, spec)
    names = sorted(p.name for p in written)
    assert names == sorted(
        [*(f"sample_{k:03d}.png" for k in range(4)), "contact_sheet.png",
         "particles.safetensors", "trace.json"]
    )  # fmt: skip
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert [level["step"] for level in trace["levels"]] == list(range(len(result.trace)))
    assert trace["image_indices"] == list(result.image_indices)
    from PIL import Image

    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.width > 2 * 96 and sheet.height > 96


def test_video_samples_become_frames_and_an_mp4(
    stack: LocalStack, pixels: dict[str, str], tmp_path: Path
) -> None:
    spec = GenerationSpec.from_mapping(
        {
            "settings": {"num_particles": 4, "num_steps": 4, "mcmc_steps": 0},
            "experts": [{"address": pixels["video"]}],
            "output": {"samples": 2, "fps": 4},
        }
    )
    with Client.from_stack(stack) as client:
        result = client.generate(spec, timeout=scaled(60))
    assert result.video.shape == (2, 4, 8, 8, 3) and result.video.dtype.name == "uint8"
    written = write_outputs(result, tmp_path, spec)
    mp4 = tmp_path / "sample_000.mp4"
    assert mp4 in written and (tmp_path / "contact_sheet.png") in written
    import imageio.v3 as iio

    frames = iio.imread(mp4, plugin="FFMPEG")
    assert frames.shape[0] == 4 and frames.shape[-1] == 3
