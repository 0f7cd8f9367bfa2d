"""The ComfyUI node pack (``clients/comfyui``, package ``poegen-nodes``) on a real ComfyUI server.

ComfyUI runs only in its own environment (``.venv-comfyui``, made by
``scripts/setup_comfyui.sh``, which this module runs first: a no-op once it is installed):
ComfyUI 0.3.75 on the CPU, with the pack linked into a fresh ``custom_nodes`` folder. One
server, started once per module on 127.0.0.1 and a free port, serves every test over its HTTP
API (``/prompt``, ``/history``, ``/interrupt``, ``/view``, ``/ws``).

The shipped workflow (``clients/comfyui/api_workflows/poe_digits.json``, ComfyUI's API format,
POSTed as it is) starts poegen's digit experts with PoE Stack (``digits``: expert servers and
the Sampler as processes of the ComfyUI server), composes the digit prior with the "three"
reward through two PoE Expert nodes, samples with PoE Sampler and saves the images with
ComfyUI's SaveImage. The checks:

* the saved PNGs are 16×16, not constant, and equal pixel for pixel the images the SDK
  (:class:`poegen.clients.sdk.Client`) returns for the same spec and seed on the same stack;
* progress reaches ComfyUI's websocket (``progress_state`` per level, preview images);
* regions (a MASK, a box), chained experts and an IMAGE condition reach the Sampler: a second
  workflow (PoE Stack reaching the running stack by its endpoints) equals the SDK too;
* a bad field is a node error naming it: a malformed box fails the prompt's validation on
  ``box``; a label the reward does not know fails the PoE Sampler, naming the PoE Expert node,
  its input ``text`` and the spec's field ``experts[1].condition.text``;
* ``/interrupt`` during a long job ends the prompt as interrupted and cancels the job on the
  Sampler (the stack's Sampler runs one job at a time: an SDK job right after completes; had
  the interrupted job gone on, it would wait minutes for the slot);
* stopping ComfyUI (SIGINT) stops the stack it started.

The websocket client runs in ``.venv-comfyui`` (aiohttp is ComfyUI's own dependency).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.remote import free_port
from helpers.timing import scaled
from PIL import Image

from poegen.clients.errors import GenerationError, GenerationTimeout
from poegen.clients.sdk import Client
from poegen.clients.spec import SpecBuilder
from poegen.clients.stack import wait_serving

REPO = Path(__file__).resolve().parents[2]
PACK = REPO / "clients/comfyui"
WORKFLOW = PACK / "api_workflows/poe_digits.json"
DOCS = REPO / "docs/comfyui.md"
VENV = REPO / ".venv-comfyui"
PYTHON = VENV / "bin/python"
# The commands docs/comfyui.md shows, run here as they are (bash, in the repository, with
# BASE = ComfyUI's base folder, PORT = its port, OUT = the screenshot)
SETUP = "bash scripts/setup_comfyui.sh"
LINK = (
    'mkdir -p "$BASE/custom_nodes" && ln -s "$PWD/clients/comfyui"'
    ' "$BASE/custom_nodes/poegen-nodes"'
)
START = (
    '.venv-comfyui/bin/python .venv-comfyui/ComfyUI/main.py --cpu --listen 127.0.0.1 --port "$PORT"'
    ' --base-directory "$BASE" --disable-auto-launch --database-url sqlite:///:memory:'
)
# the first test's setup may install .venv-comfyui (minutes) and starts ComfyUI and a stack
pytestmark = pytest.mark.timeout(scaled(1800))
SCREENSHOT = (
    '.venv-comfyui/bin/python clients/comfyui/tools/screenshot.py --url "http://127.0.0.1:$PORT"'
    ' --workflow clients/comfyui/api_workflows/poe_digits.json --out "$OUT" --run'
)
STACK, EXPERT_PRIOR, EXPERT_REWARD, SAMPLER, SAVE = "1", "2", "3", "4", "5"  # the workflow's ids

# Posts a prompt over ComfyUI's HTTP API while listening on its websocket (as the frontend
# does, announcing preview support); optionally interrupts once the PoE Sampler reports a level.
WS_CLIENT = r"""
import asyncio, json, struct, sys
from pathlib import Path
import aiohttp

async def main(url, prompt_file, out, interrupt):
    client_id = "poegen-test"
    prompt = json.loads(Path(prompt_file).read_text())
    events, previews, interrupted = [], 0, False
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
            await ws.send_str(json.dumps(flags))
            body = {"prompt": prompt, "client_id": client_id}
            async with session.post(f"{url}/prompt", json=body) as reply:
                answer = await reply.json()
            if reply.status != 200:
                print(json.dumps({"status": reply.status, "answer": answer}))
                return
            prompt_id = answer["prompt_id"]
            Path(out, prompt_id).mkdir()
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    kind, size = struct.unpack(">II", message.data[:8])
                    meta = json.loads(message.data[8 : 8 + size])
                    if kind == 4 and meta.get("prompt_id") == prompt_id:
                        Path(out, prompt_id, f"preview{previews}.img").write_bytes(
                            message.data[8 + size :])
                        events.append({"type": "preview", "node": meta["node_id"]})
                        previews += 1
                    continue
                event = json.loads(message.data)
                data = event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "progress_state":
                    for node, state in data["nodes"].items():
                        events.append({"type": "progress", "node": node, "value": state["value"],
                                       "max": state["max"], "state": state["state"]})
                        if node == interrupt and state["value"] >= 1 and not interrupted:
                            async with session.post(f"{url}/interrupt", json={}) as r:
                                interrupted = r.status == 200
                else:
                    events.append({"type": event["type"]})
                if event["type"] in ("execution_success", "execution_error",
                                     "execution_interrupted"):
                    break
    print(json.dumps({"status": 200, "prompt_id": prompt_id, "events": events,
                      "previews": previews, "interrupted": interrupted}))

asyncio.run(main(*sys.argv[1:4], sys.argv[4] if len(sys.argv) > 4 else ""))
"""


@dataclass
class Comfy:
    """The running ComfyUI: its address, base folder (custom_nodes, input, output) and log."""

    url: str
    port: int
    base: Path
    proc: subprocess.Popen
    log: Path
    scratch: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=scaled(30)) as reply:
            return json.loads(reply.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=scaled(30)) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def run(self, prompt: dict[str, Any], *, interrupt: str = "", timeout: float = 300) -> dict:
        """POST ``prompt`` over the websocket client and wait for its end; the client's record
        (``events``, ``previews``) plus the prompt's ``/history`` entry (``history``)."""
        self.scratch.mkdir(exist_ok=True)
        prompt_file = self.scratch / "prompt.json"
        prompt_file.write_text(json.dumps(prompt))
        out = subprocess.run(
            [str(PYTHON), "-c", WS_CLIENT, self.url, str(prompt_file), str(self.scratch),
             interrupt],
            capture_output=True, text=True, timeout=scaled(timeout),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:] + self.tail()
        record = json.loads(out.stdout.strip().splitlines()[-1])
        if record["status"] == 200:
            record["history"] = self._history(record["prompt_id"])
        return record

    def _history(self, prompt_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + scaled(30)
        while True:  # the history entry is written right after the last message
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None or time.monotonic() > deadline:
                assert entry is not None, f"no history for {prompt_id}" + self.tail()
                return entry
            time.sleep(0.1)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n--- ComfyUI log ---\n" + "\n".join(text[-lines:])


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Comfy]:
    base = tmp_path_factory.mktemp("comfyui")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env |= {"BASE": str(base), "PORT": str(port)}
    subprocess.run(["bash", "-c", SETUP], cwd=REPO, env=env, check=True, timeout=3600)
    subprocess.run(["bash", "-c", LINK], cwd=REPO, env=env, check=True, timeout=scaled(30))
    (base / "input").mkdir()
    _digit_png(base / "input/digit.png")
    log = base / "comfyui.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {START}"], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
            env=env, process_group=0,
        )  # fmt: skip
    server = Comfy(f"http://127.0.0.1:{port}", port, base, proc, log, base / "scratch")
    try:
        deadline = time.monotonic() + scaled(180)
        while True:
            assert proc.poll() is None, "ComfyUI exited" + server.tail()
            try:
                server.get("/object_info/PoeSampler")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "ComfyUI did not listen" + server.tail()
                time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (ComfyUI exits, its atexit hook stops the stacks it started), then SIGKILL."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(scaled(30))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _digit_png(path: Path) -> None:
    """A held-out digit (the masked-target expert's condition) as an 8-bit gray PNG."""
    from poegen.expert_servers.digits import compose

    targets, _ = compose.held_out(1)
    pixels = ((targets[0, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)


@pytest.fixture(scope="module")
def shipped(comfy: Comfy) -> dict[str, Any]:
    """The shipped workflow, run once; its record and the stack PoE Stack started."""
    workflow = json.loads(WORKFLOW.read_text())
    record = comfy.run(workflow)
    status = record["history"]["status"]
    assert status["status_str"] == "success", json.dumps(status)[-3000:] + comfy.tail()
    text = record["history"]["outputs"][STACK]["text"][0]
    endpoints = dict(line.split(" = ") for line in text.splitlines())
    return {"workflow": workflow, "record": record, "endpoints": endpoints, "text": text}


def _saved(comfy: Comfy, record: dict[str, Any], node: str) -> list[np.ndarray]:
    images = record["history"]["outputs"][node]["images"]
    paths = [comfy.base / "output" / i["subfolder"] / i["filename"] for i in images]
    assert all(i["type"] == "output" for i in images) and all(p.is_file() for p in paths)
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _sdk_images(endpoints: dict[str, str], spec: Any) -> list[np.ndarray]:
    experts = {k: v for k, v in endpoints.items() if k != "sampler"}
    with Client(endpoints["sampler"], endpoints=experts) as client:
        result = client.generate(spec, timeout=scaled(120))
    return [np.asarray(image.convert("RGB")) for image in result.images]


def test_the_shipped_workflow_saves_what_the_sdk_returns(
    comfy: Comfy, shipped: dict[str, Any]
) -> None:
    saved = _saved(comfy, shipped["record"], SAVE)
    node = shipped["workflow"][SAMPLER]["inputs"]
    assert len(saved) == node["samples"]
    for image in saved:
        assert image.shape == (16, 16, 3)
        assert np.ptp(image) > 0  # not a constant picture
    prior = shipped["workflow"][EXPERT_PRIOR]["inputs"]
    reward = shipped["workflow"][EXPERT_REWARD]["inputs"]
    spec = (
        SpecBuilder(seed=node["seed"], sample_shape=[1, 16, 16])
        .expert(endpoint=prior["endpoint"], weight=prior["weight"])
        .expert(endpoint=reward["endpoint"], weight=reward["weight"], text=reward["text"])
        .settings(
            preset=node["preset"],
            num_particles=node["particles"],
            num_steps=node["levels"],
            mcmc_steps=node["mcmc_steps"],
            **json.loads(node["settings"]),
        )
        .output(samples=node["samples"])
        .preview(node["previews"])
        .build()
    )
    expected = _sdk_images(shipped["endpoints"], spec)
    assert len(expected) == len(saved)
    for got, want in zip(saved, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_queueing_it_again_reuses_the_stack_and_the_result(
    comfy: Comfy, shipped: dict[str, Any]
) -> None:
    record = comfy.run(shipped["workflow"])
    status = record["history"]["status"]
    assert status["status_str"] == "success"
    (cached,) = [data["nodes"] for kind, data in status["messages"] if kind == "execution_cached"]
    # PoE Stack's output (the running stack) and PoE Sampler's (the same job's images)
    assert {STACK, EXPERT_PRIOR, EXPERT_REWARD, SAMPLER} <= set(cached)


def test_progress_and_previews_reach_the_websocket(shipped: dict[str, Any], comfy: Comfy) -> None:
    record = shipped["record"]
    levels = [e for e in record["events"] if e["type"] == "progress" and e["node"] == SAMPLER]
    values = [e["value"] for e in levels if e["state"] == "running"]
    assert len(values) >= 2 and values == sorted(values)
    assert levels[-1]["state"] == "finished" and levels[-1]["value"] == levels[-1]["max"]
    previews = [e for e in record["events"] if e["type"] == "preview"]
    assert record["previews"] >= 1 and all(e["node"] == SAMPLER for e in previews)
    with Image.open(comfy.scratch / record["prompt_id"] / "preview0.img") as preview:
        assert preview.size[0] == preview.size[1] >= 16  # ComfyUI scales it for display


def test_regions_chains_and_image_conditions_equal_the_sdk(
    comfy: Comfy, shipped: dict[str, Any]
) -> None:
    def expert(endpoint: str, **inputs: Any) -> dict[str, Any]:
        defaults = {"weight": 1.0, "text": "", "box": "", "image_name": "image"}
        return {"class_type": "PoeExpert", "inputs": {"endpoint": endpoint, "image_mode": "RGB",
                                                      **defaults, **inputs}}  # fmt: skip

    settings = {"step_size": 0.3}
    sampler = {
        "stack": ["1", 0], "experts_1": ["4", 0], "experts_2": ["6", 0], "seed": 3,
        "particles": 8, "levels": 8, "mcmc_steps": 1, "preset": "default",
        "sample_shape": "1, 16, 16", "samples": 0, "settings": json.dumps(settings),
        "previews": False,
    }  # fmt: skip
    workflow = {
        "1": {"class_type": "PoeStack",
              "inputs": {"action": "connect", "stack_file": "", "endpoints": shipped["text"]}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 16}},
        "3": expert("low", mask=["2", 0]),
        "4": expert("even", box="[[0, 16], [0, 16]]", experts=["3", 0]),
        "5": {"class_type": "LoadImage", "inputs": {"image": "digit.png"}},
        "6": expert("left-half", weight=4.0, image=["5", 0], image_name="target", image_mode="L"),
        "7": {"class_type": "PoeSampler", "inputs": sampler},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 1], "filename_prefix": "mix"}},
    }  # fmt: skip
    record = comfy.run(workflow)
    assert record["history"]["status"]["status_str"] == "success", comfy.tail()
    saved = _saved(comfy, record, "8")
    assert len(saved) == sampler["particles"]
    full = {"box": [[0, 16], [0, 16]]}
    target = {"file": str(comfy.base / "input/digit.png"), "mode": "L"}
    spec = (
        SpecBuilder(seed=sampler["seed"], sample_shape=[1, 16, 16])
        .expert(endpoint="low", region=full)  # the all-ones MASK
        .expert(endpoint="even", region=full)
        .expert(endpoint="left-half", weight=4.0, tensors={"target": target})
        .settings(num_particles=8, num_steps=8, mcmc_steps=1, **settings)
        .output(samples=0)
        .build()
    )
    for got, want in zip(saved, _sdk_images(shipped["endpoints"], spec), strict=True):
        np.testing.assert_array_equal(got, want)


def test_malformed_inputs_fail_validation_naming_each_input(
    comfy: Comfy, shipped: dict[str, Any]
) -> None:
    workflow = copy.deepcopy(shipped["workflow"])
    workflow[EXPERT_PRIOR]["inputs"]["box"] = "[[0, 16]"
    workflow[SAMPLER]["inputs"]["settings"] = '["step_size"]'
    workflow[STACK]["inputs"]["endpoints"] = "sampler: 127.0.0.1:1"
    status, answer = comfy.post("/prompt", {"prompt": workflow})
    assert status == 400
    expected = {
        EXPERT_PRIOR: ("PoeExpert", "box", "not JSON"),
        SAMPLER: ("PoeSampler", "settings", "expected a JSON object"),
        STACK: ("PoeStack", "endpoints", "line 1: expected 'name = host:port'"),
    }
    assert set(answer["node_errors"]) == set(expected)
    for node, (class_type, name, problem) in expected.items():
        errors = answer["node_errors"][node]["errors"]
        assert answer["node_errors"][node]["class_type"] == class_type
        assert [e["extra_info"]["input_name"] for e in errors] == [name]
        assert problem in errors[0]["details"]


def test_a_sampler_error_names_the_node_input_and_field(
    comfy: Comfy, shipped: dict[str, Any]
) -> None:
    workflow = copy.deepcopy(shipped["workflow"])
    workflow[EXPERT_REWARD]["inputs"]["text"] = "eleven"
    record = comfy.run(workflow)
    status = record["history"]["status"]
    assert status["status_str"] == "error"
    (error,) = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert error["node_id"] == SAMPLER and error["node_type"] == "PoeSampler"
    message = error["exception_message"]
    assert f"node {EXPERT_REWARD} input 'text' (experts[1].condition.text)" in message
    assert "INVALID_ARGUMENT" in message and "eleven" in message


def test_interrupt_cancels_the_job_on_the_sampler(comfy: Comfy, shipped: dict[str, Any]) -> None:
    workflow = copy.deepcopy(shipped["workflow"])
    # minutes of work unless it is cancelled
    workflow[SAMPLER]["inputs"].update(particles=256, levels=10_000, seed=11)
    record = comfy.run(workflow, interrupt=SAMPLER)
    assert record["interrupted"]
    status = record["history"]["status"]
    kinds = [kind for kind, _ in status["messages"]]
    assert "execution_interrupted" in kinds and status["status_str"] == "error"
    # the Sampler runs one job at a time: this one gets the slot only if the other stopped
    quick = SpecBuilder(seed=0, sample_shape=[1, 16, 16]).expert(endpoint="all")
    spec = quick.settings(num_particles=4, num_steps=4, mcmc_steps=0).build()
    try:
        assert len(_sdk_images(shipped["endpoints"], spec)) == 4
    except GenerationTimeout:
        pytest.fail("the interrupted job still holds the Sampler's slot")


def test_the_frontend_renders_the_shipped_graph_and_its_outputs(
    comfy: Comfy, shipped: dict[str, Any], tmp_path: Path
) -> None:
    """The docs' screenshot: ComfyUI's own frontend in headless Chromium, the shipped workflow
    loaded and run (cached: the stack and outputs of the first run)."""
    out = tmp_path / "graph.png"
    env = {**os.environ, "PORT": str(comfy.port), "OUT": str(out)}
    done = subprocess.run(
        ["bash", "-c", SCREENSHOT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=scaled(300),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + comfy.tail()
    shown = {node["id"]: node for node in json.loads(done.stdout.strip().splitlines()[-1])}
    workflow = shipped["workflow"]
    assert set(shown) == set(workflow)
    for key, node in workflow.items():
        assert shown[key]["type"] == node["class_type"]
        assert shown[key]["title"] == node["_meta"]["title"]
    assert shown[SAVE]["images"] == workflow[SAMPLER]["inputs"]["samples"]
    with Image.open(out) as picture:
        assert picture.size == (1400, 800)
        assert np.ptp(np.asarray(picture.convert("L"))) > 100


def test_the_pack_carries_registry_metadata() -> None:
    """ComfyUI's own parser reads the pack's pyproject (the registry's ``[tool.comfy]``)."""
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[2]);"
        "from comfy_config import config_parser as c;"
        "p = c.extract_node_configuration(sys.argv[1]);"
        "print(json.dumps([p.project.name, p.tool_comfy.publisher_id, p.tool_comfy.display_name,"
        " p.tool_comfy.includes]))"
    )
    done = subprocess.run(
        [str(PYTHON), "-c", script, str(PACK), str(VENV / "ComfyUI")],
        capture_output=True, text=True, timeout=scaled(60),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    name, publisher, display, includes = json.loads(done.stdout)
    assert name == "poegen-nodes" and "comfyui" not in name.lower()
    assert publisher == "poegen" and display and includes == ["api_workflows"]
    assert all((PACK / folder).is_dir() for folder in includes)


def test_the_docs_show_the_commands_these_tests_run() -> None:
    text = DOCS.read_text()
    for command in (SETUP, LINK, START, SCREENSHOT):
        assert command in text, command
    assert "api_workflows/poe_digits.json" in text


# ---------------------------------------------------------------- conversions (no ComfyUI)


@pytest.fixture(scope="module")
def convert() -> Any:
    """``poegen_nodes.convert`` (it imports no ComfyUI), loaded from the pack's folder."""
    import importlib.util
    import sys

    name = "poegen_nodes_convert"
    spec = importlib.util.spec_from_file_location(name, PACK / "poegen_nodes/convert.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_endpoints_text_round_trips_and_names_a_bad_line(convert: Any) -> None:
    handle = convert.StackHandle("127.0.0.1:1", {"all": "127.0.0.1:2", "left-half": "[::1]:3"})
    assert convert.parse_endpoints(convert.format_endpoints(handle)) == handle
    with pytest.raises(ValueError, match="line 2: expected 'name = host:port'"):
        convert.parse_endpoints("sampler = 127.0.0.1:1\nall 127.0.0.1:2")
    with pytest.raises(ValueError, match="no 'sampler = host:port' line"):
        convert.parse_endpoints("# comment\nall = 127.0.0.1:2")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("[[0, 16]", "not JSON"), ("[[4, 2]]", "0 <= start < stop"), ("[[0, 1.5]]", "integer")],
)
def test_a_bad_box_says_what_is_wrong(convert: Any, text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        convert.parse_box(text)


def test_boxes_and_shapes_parse(convert: Any) -> None:
    assert convert.parse_box(" ") is None
    assert convert.parse_box("[[0, 16], [8, 16]]") == ((0, 16), (8, 16))
    assert convert.parse_shape("1, 16, 16") == (1, 16, 16) and convert.parse_shape("") is None
    with pytest.raises(ValueError, match="positive integers"):
        convert.parse_shape("1, 0")


def test_spec_fields_name_the_node_and_input(convert: Any) -> None:
    experts = [convert.ExpertEntry("7", "all"), convert.ExpertEntry("9", "reward")]
    expected = {
        "experts[1].condition.text": ("9", "text"),
        "experts[0].region.box": ("7", "box"),
        "experts[0].condition.tensors[target]": ("7", "image"),
        "experts[1].address": ("9", "endpoint"),
        "settings.num_particles": ("4", "particles"),
        "settings.num_steps": ("4", "levels"),
        "settings.step_size": ("4", "settings"),
        "sample_shape": ("4", "sample_shape"),
    }
    for field, (node, name) in expected.items():
        assert convert.node_input(field, experts, "4") == (node, name), field
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    error = convert.node_error(GenerationError(invalid, "factors[1].weight", "bad"), experts, "4")
    assert str(error) == "node 9 input 'weight' (experts[1].weight): INVALID_ARGUMENT: bad"
    error = convert.node_error(GenerationError(invalid, "", "no experts"), experts, "4")
    assert str(error) == "node 4 (spec): INVALID_ARGUMENT: no experts"


def test_condition_images_map_to_minus_one_one(convert: Any) -> None:
    generator = torch.Generator().manual_seed(0)
    gray = torch.rand(1, 5, 7, 1, generator=generator).expand(1, 5, 7, 3)
    got = convert.image_condition(gray, "L")
    assert got.shape == (1, 5, 7)
    assert torch.equal(got[0], 2 * gray[0, ..., 0] - 1)  # a gray image's value exactly
    color = torch.rand(2, 5, 7, 3, generator=generator)
    luma = (color[0] * torch.tensor([0.299, 0.587, 0.114])).sum(-1)
    torch.testing.assert_close(convert.image_condition(color, "L")[0], 2 * luma - 1)
    assert torch.equal(convert.image_condition(color, "RGB"), 2 * color[0].permute(2, 0, 1) - 1)


def test_stopping_comfyui_stops_the_stack_it_started(comfy: Comfy, shipped: dict[str, Any]) -> None:
    sampler = shipped["endpoints"]["sampler"]
    assert wait_serving(sampler, deadline=time.monotonic() + scaled(10))
    _stop(comfy.proc)
    assert comfy.proc.returncode == 0, comfy.tail()
    deadline = time.monotonic() + scaled(20)
    while wait_serving(sampler, deadline=time.monotonic() + 1):
        assert time.monotonic() < deadline, f"the stack's Sampler at {sampler} still serves"
