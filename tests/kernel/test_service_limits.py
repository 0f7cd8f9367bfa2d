"""The Sampler's limits and refusals (issue 16, items 1, 2, 3, 6 and 7, and the drain), over real hosts on 127.0.0.1:
requests that would allocate without bound are refused before anything is allocated, with the
field to blame; an expert answering NaN fails the job naming that expert; a slow reader costs
the service a bounded number of events; an empty token is refused at start-up; addresses the
sampler may not call are refused before it dials them, and its token goes only to listed
experts; a stopping sampler drains its running jobs within the grace. After each
refusal the same server runs a good job.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time

import grpc
import pytest
import torch
from helpers.remote import Counter, CountingGaussian, LoopThread, free_port, wait_until
from helpers.server_experts import Gaussian
from helpers.timing import scaled
from torch import Tensor

from poegen.clients.sampler_cli import SamplerFlags, sampler_config
from poegen.expert_servers.server import ServerConfig
from poegen.expert_servers.server.config import ConfigError
from poegen.kernel import codec
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.refusal import Code
from poegen.kernel.service import (
    MAX_NAME_CHARS,
    MAX_PENDING_EVENTS,
    Job,
    JobSlots,
    SamplerServerConfig,
    job_bytes,
    parse_request,
)
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

SETTINGS = dict(num_particles=16, num_steps=4, mcmc_steps=1)


class NaNBelow(Gaussian):
    """A fault injected on purpose: NaN velocities once σ drops below ``sigma``."""

    def __init__(self, sigma: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.sigma = sigma

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        v = super().velocity(x, sigma)
        return torch.where((sigma < self.sigma).view(-1, *[1] * (x.ndim - 1)), math.nan, v)


def _request(
    addresses: list[str], *, names: list[str] | None = None, **kw: object
) -> sampler_pb2.GenerateRequest:
    factors = [
        sampler_pb2.FactorSpec(address=a, weight=1.0, name=(names or [""] * len(addresses))[i])
        for i, a in enumerate(addresses)
    ]
    settings = sampler_pb2.SamplerSettings(**{**SETTINGS, **kw.pop("settings", {})})  # type: ignore[arg-type]
    return sampler_pb2.GenerateRequest(
        factors=factors,
        sample_shape=kw.pop("sample_shape", [2]),  # type: ignore[arg-type]
        settings=settings,
        seed=3,
        **kw,  # type: ignore[arg-type]
    )


def _refusal(stub: sampler_pb2_grpc.SamplerServiceStub, request: object) -> tuple[object, str]:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=scaled(60)))
    err = from_rpc_error(caught.value)
    assert err is not None, caught.value
    return caught.value.code(), err.field


@pytest.fixture
def served(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), name="g"))
    sampler = loop.sampler()
    channel = grpc.insecure_channel(sampler.address)
    yield expert.address, sampler_pb2_grpc.SamplerServiceStub(channel), loop
    channel.close()


def _works(stub: sampler_pb2_grpc.SamplerServiceStub, address: str) -> None:
    replies = list(stub.Generate(_request([address]), timeout=scaled(60)))
    assert replies[-1].HasField("result")


@pytest.mark.parametrize(
    ("settings", "sample_shape", "code", "field"),
    [
        # 32 bytes that once asked for 4.5 GB (10**7 levels) or for 8e18 bytes (10**18)
        ({"num_steps": 10**7}, [2], grpc.StatusCode.RESOURCE_EXHAUSTED, "settings.num_steps"),
        ({"num_steps": 10**18}, [2], grpc.StatusCode.RESOURCE_EXHAUSTED, "settings.num_steps"),
        # a job that would never end: 10^9 moves per level
        ({"mcmc_steps": 10**9}, [2], grpc.StatusCode.RESOURCE_EXHAUSTED, "settings.mcmc_steps"),
        ({"mcmc": "hmc", "mcmc_steps": 2000, "leapfrog_steps": 1000}, [2],
         grpc.StatusCode.RESOURCE_EXHAUSTED, "settings.mcmc_steps"),
        # 2^27 particles: over max_elements
        ({"num_particles": 1 << 27}, [2], grpc.StatusCode.RESOURCE_EXHAUSTED,
         "settings.num_particles"),
        # at max_elements (2^26) but, with four factors, over the working-set estimate (8 GiB)
        ({"num_particles": 1 << 22}, [16], grpc.StatusCode.RESOURCE_EXHAUSTED,
         "settings.num_particles"),
        # non-finite settings are blamed on themselves (once: factors[0] and num_steps)
        ({"step_size": math.inf}, [2], grpc.StatusCode.INVALID_ARGUMENT, "settings.step_size"),
        ({"shift": math.inf}, [2], grpc.StatusCode.INVALID_ARGUMENT, "settings.shift"),
        ({"sde_noise": math.nan}, [2], grpc.StatusCode.INVALID_ARGUMENT, "settings.sde_noise"),
    ],
)  # fmt: skip
def test_a_request_over_a_limit_is_refused_with_its_field(served, settings, sample_shape, code,
                                                          field):  # fmt: skip
    address, stub, _ = served
    request = _request([address] * 4, settings=settings, sample_shape=sample_shape)
    assert _refusal(stub, request) == (code, field)
    _works(stub, address)


def test_the_working_set_estimate_decides_the_fourth_case():
    """The cases above sit on either side of the limits they name."""
    config = SamplerServerConfig()
    assert (1 << 22) * 16 <= config.max_elements < (1 << 27) * 2
    assert job_bytes((1 << 22) * 16, 4) > config.max_job_bytes
    assert job_bytes((1 << 22) * 16, 1) < config.max_job_bytes  # one factor: admitted


def test_a_nan_region_and_a_long_name_are_refused_with_their_field(served):
    address, stub, _ = served
    region = torch.ones(2)
    region[1] = math.nan
    request = _request([address])
    request.factors[0].region.CopyFrom(codec.encode(region))
    assert _refusal(stub, request) == (grpc.StatusCode.INVALID_ARGUMENT, "factors[0].region")
    long = _request([address], names=["n" * (MAX_NAME_CHARS + 1)])
    assert _refusal(stub, long) == (grpc.StatusCode.INVALID_ARGUMENT, "factors[0].name")
    replies = list(
        stub.Generate(_request([address], names=["n" * MAX_NAME_CHARS]), timeout=scaled(60))
    )
    assert replies[-1].HasField("result")


def test_an_expert_answering_nan_fails_the_job_naming_it(served):
    address, stub, loop = served
    broken = loop.serve(NaNBelow(0.6, mean=(0.0, 1.0), name="broken"))
    request = _request([address, broken.address], names=["good", "bad"])
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=scaled(60)))
    err = from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err is not None and err.field == "factors[1]"
    assert "'bad'" in err.reason and "velocity() returned" in err.reason
    _works(stub, address)


def test_a_reader_that_never_reads_holds_a_bounded_number_of_events(loop: LoopThread):
    """The job runs to its end while nobody takes events: MAX_PENDING_EVENTS level events wait,
    the rest are dropped, the result and the end marker still arrive."""
    expert = loop.serve(Gaussian((1.0, 0.0), name="g"))
    config = SamplerServerConfig()
    request = _request(
        [expert.address], settings={"num_steps": MAX_PENDING_EVENTS + 40, "mcmc_steps": 0},
        preview=True,
    )  # fmt: skip
    channel = grpc.insecure_channel(loop.sampler().address)
    read = list(sampler_pb2_grpc.SamplerServiceStub(channel).Generate(request, timeout=scaled(60)))
    channel.close()
    levels = sum(r.HasField("level") for r in read)  # what a reader that reads everything gets
    assert levels > MAX_PENDING_EVENTS
    plan = parse_request(request, config)

    async def submit() -> tuple[Job, asyncio.Queue]:
        slots = JobSlots(1)
        job = slots.make(plan, config)
        queue = job.subscribe()
        slots.submit(job)
        return job, queue

    job, queue = loop.run(submit())
    assert job.join(scaled(120))

    async def drain() -> list[object]:
        # runs after every callback the job scheduled (call_soon_threadsafe is FIFO)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    items = loop.run(drain())
    responses = [i for i in items if isinstance(i, sampler_pb2.GenerateResponse)]
    assert [r.HasField("level") for r in responses] == [True] * MAX_PENDING_EVENTS + [False]
    assert responses[-1].HasField("result")
    assert len(items) == MAX_PENDING_EVENTS + 2  # + the end marker
    assert job.dropped_events == levels - MAX_PENDING_EVENTS
    steps = [r.level.step for r in responses[:-1]]
    assert steps == sorted(steps) and steps[0] == 0


@pytest.mark.parametrize("variable", ["POEGEN_TOKEN", "POEGEN_EXPERT_TOKEN"])
def test_an_empty_token_is_refused_at_start_up(monkeypatch, variable):
    flags = SamplerFlags(allowed_experts=("127.0.0.1:50051",))  # the expert token needs it
    monkeypatch.setenv(variable, "")
    with pytest.raises(ConfigError, match="must not be empty"):
        sampler_config(flags)
    monkeypatch.setenv(variable, "s3cret")
    assert sampler_config(flags) is not None


# ------------------------------------------------------------------ perimeter (item 1)


@pytest.mark.parametrize(
    ("allowed", "address", "code"),
    [
        ((), "unix:/tmp/poegen-expert.sock", grpc.StatusCode.PERMISSION_DENIED),
        ((), "unix-abstract:poegen", grpc.StatusCode.PERMISSION_DENIED),
        ((), "dns:///127.0.0.1:1", grpc.StatusCode.PERMISSION_DENIED),
        ((), "10.0.0.1:50051", grpc.StatusCode.PERMISSION_DENIED),  # not loopback, no list
        ((), "example.com:443", grpc.StatusCode.PERMISSION_DENIED),
        (("*",), "unix:/tmp/poegen-expert.sock", grpc.StatusCode.PERMISSION_DENIED),
        (("127.0.0.1:1",), "127.0.0.2:1", grpc.StatusCode.PERMISSION_DENIED),  # a list is a list
        ((), "no-port", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_addresses_the_sampler_may_not_call_are_refused_before_dialling(
    loop: LoopThread, allowed, address, code
):
    with socket.socket() as listener:  # would see a connection if the sampler dialled it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        sampler = loop.sampler(SamplerServerConfig(allowed_experts=allowed))
        with grpc.insecure_channel(sampler.address) as channel:
            stub = sampler_pb2_grpc.SamplerServiceStub(channel)
            assert _refusal(stub, _request([address])) == (code, "factors[0].address")
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_loopback_is_callable_by_default_and_a_star_opens_any_host_port(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), name="g"))
    for allowed, address in [((), expert.address), ((), f"localhost:{expert.port}"),
                             (("*",), expert.address)]:  # fmt: skip
        sampler = loop.sampler(SamplerServerConfig(allowed_experts=allowed))
        with grpc.insecure_channel(sampler.address) as channel:
            _works(sampler_pb2_grpc.SamplerServiceStub(channel), address)


def test_the_expert_token_goes_only_to_listed_experts():
    with pytest.raises(ValueError, match="expert_token: needs allowed_experts"):
        SamplerServerConfig(expert_token="s3cret")
    with pytest.raises(ValueError, match="expert_token: needs allowed_experts"):
        SamplerServerConfig(expert_token="s3cret", allowed_experts=("*",))
    assert SamplerServerConfig(expert_token="s3cret", allowed_experts=("127.0.0.1:1",))


def test_a_token_guarded_expert_sees_the_token_only_when_listed(loop: LoopThread):
    """An expert host that needs the token serves a job when the sampler lists it; a caller's
    own listener, not listed, is never dialled (so it never sees the token)."""
    expert = loop.serve(Gaussian((1.0, 0.0), name="g"), ServerConfig(token="s3cret"))
    sampler = loop.sampler(
        SamplerServerConfig(expert_token="s3cret", allowed_experts=(expert.address,))
    )
    with grpc.insecure_channel(sampler.address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        _works(stub, expert.address)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listener.setblocking(False)
            trap = f"127.0.0.1:{listener.getsockname()[1]}"
            refused = _refusal(stub, _request([trap]))
            assert refused == (grpc.StatusCode.PERMISSION_DENIED, "factors[0].address")
            with pytest.raises(BlockingIOError):
                listener.accept()


def test_an_unreachable_expert_does_not_say_why(loop: LoopThread):
    """Refused, reset or no route: the caller hears UNAVAILABLE and the method, nothing about
    the transport (which would make the sampler a port scanner); the log has the detail."""
    sampler = loop.sampler(SamplerServerConfig(expert_retries=0))
    with grpc.insecure_channel(sampler.address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(_request([f"127.0.0.1:{free_port()}"]), timeout=scaled(60)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details().lower()
    assert "refused" not in details and "connect" not in details and "127.0.0.1" not in details


# ------------------------------------------------------------------ drain (SIGTERM)


def _stop_in_background(loop: LoopThread, host, grace: float):
    return asyncio.run_coroutine_threadsafe(host.stop(grace), loop.loop)


def test_a_stopping_sampler_lets_running_jobs_finish_and_refuses_new_ones(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.02, name="g"))
    sampler = loop.sampler()
    slots = sampler.host.servicer.jobs
    request = _request([expert.address], settings={"num_steps": 30, "mcmc_steps": 1})
    with grpc.insecure_channel(sampler.address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        whole = list(stub.Generate(request, timeout=scaled(120)))  # the same job, undisturbed
        call = stub.Generate(request, timeout=scaled(120))
        accepted, first = next(call), next(call)
        assert accepted.HasField("job") and first.HasField("level")
        stopping = _stop_in_background(loop, sampler.host, scaled(60))
        assert wait_until(lambda: slots._closed, timeout=scaled(10))
        assert _refusal(stub, _request([expert.address])) == (
            grpc.StatusCode.UNAVAILABLE,
            "request",
        )
        rest = list(call)  # the running job finishes: every level, then its result
        assert len([accepted, first, *rest]) == len(whole)  # every level, then the result
        assert rest[-1].result == whole[-1].result  # the same result, bit for bit
    stopping.result(scaled(60))


def test_jobs_still_running_at_the_end_of_the_grace_are_stopped(loop: LoopThread):
    counter = Counter()
    expert = loop.serve(CountingGaussian(delay_s=0.05, counter=counter))
    sampler = loop.sampler()
    request = _request([expert.address], settings={"num_steps": 10_000, "mcmc_steps": 1})
    with grpc.insecure_channel(sampler.address) as channel:
        call = sampler_pb2_grpc.SamplerServiceStub(channel).Generate(request, timeout=scaled(120))
        next(call)
        _stop_in_background(loop, sampler.host, 0.5).result(scaled(60))
        with pytest.raises(grpc.RpcError):
            list(call)
    assert not sampler.host.servicer.jobs.running()
    calls = counter.calls
    time.sleep(0.3)
    assert counter.calls == calls  # the stopped job makes no more expert calls
    assert calls < 10_000


@pytest.mark.parametrize(
    ("field", "path"),
    [("mcmc", "settings.mcmc"), ("num_steps", "settings.num_steps"),
     ("sample_shape", "sample_shape"), ("factors[2].region", "factors[2].region"),
     ("weight", "factors")],
)  # fmt: skip
def test_the_kernels_field_becomes_a_request_path_without_reading_the_message(field, path):
    from poegen.kernel.experts import KernelError
    from poegen.kernel.service import job_error

    error = KernelError(field, "a reason: with a colon")
    assert str(error) == f"{field}: a reason: with a colon"
    mapped = job_error(error, None)  # type: ignore[arg-type]
    assert mapped.code == Code.INVALID_ARGUMENT and mapped.field == path
