"""Screenshot a workflow in ComfyUI's own frontend, headless (the docs' picture of the graph).

::

    python clients/comfyui/tools/screenshot.py --url http://127.0.0.1:8188 \
        --workflow clients/comfyui/api_workflows/poe_digits.json --out graph.png [--run]

Starts headless Chromium (``--chromium``, default ``chromium``: Debian's package) with the
DevTools protocol, opens the ComfyUI server at ``--url``, loads the API-format workflow with the
frontend's own ``app.loadApiJson`` (which lays the nodes out with LiteGraph's ``arrange``),
fits the view, and with ``--run`` queues the prompt and waits until every output node shows its
images. Then it writes a PNG of the page and prints, as JSON, what the page shows: each node's
id, type, title and number of images. Needs aiohttp (a ComfyUI dependency) and poegen: run it with
ComfyUI's Python. Nothing is drawn by this script: the picture is what the frontend renders.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from poegen.clients.stack import group_members

READY = (
    "!!(window.app && window.app.graph && window.app.canvas && document.querySelector('canvas'))"
)
# a fresh user's settings would open the template browser and a minimap over the graph, and
# draw small nodes as grey boxes (level of detail by font size)
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}
# what the page shows: each node's id, type, title and images (printed as JSON)
SHOWN = (
    "app.graph._nodes.map(n => ({id: String(n.id), type: n.type, title: n.title,"
    " images: n.imgs ? n.imgs.length : 0}))"
)
# the workflow's seeds as the file gives them: the frontend would randomize them after queueing
FIXED_SEEDS = (
    "app.graph._nodes.forEach(n => (n.widgets || []).forEach(w => {"
    " if (w.name === 'control_after_generate') w.value = 'fixed'; }))"
)
# the frontend keeps the "Nodes 2.0" banner's dismissal in the browser's localStorage
DISMISS_BANNER = "localStorage.setItem('vueNodesBannerDismissed', 'true')"


class DevTools:
    """A minimal DevTools-protocol session on one page."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        async for message in self.ws:
            reply = json.loads(message.data)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise RuntimeError("the DevTools connection closed")

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}…: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout:.0f} s")
            await asyncio.sleep(0.25)


async def shoot(args: argparse.Namespace) -> None:
    workflow = json.loads(Path(args.workflow).read_text())
    outputs = [
        k for k, node in workflow.items() if node["class_type"] in ("SaveImage", "PreviewImage")
    ]
    async with aiohttp.ClientSession() as http:
        for key, value in QUIET_SETTINGS.items():
            async with http.post(f"{args.url}/settings/{key}", json=value) as reply:
                reply.raise_for_status()
        with tempfile.TemporaryDirectory(prefix="poegen-chromium-") as profile:
            browser = subprocess.Popen(
                [
                    args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--no-first-run", "--hide-scrollbars", "--remote-debugging-port=0",
                    f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                process_group=0,  # its zygote and renderers too, to stop them all
            )  # fmt: skip
            try:
                port = _devtools_port(browser, args.timeout)
                async with http.get(f"http://127.0.0.1:{port}/json/list") as reply:
                    page = next(t for t in await reply.json() if t["type"] == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    tools = DevTools(ws)
                    await tools.call("Page.enable")
                    await tools.call(
                        "Emulation.setDeviceMetricsOverride",
                        width=args.width, height=args.height, deviceScaleFactor=1, mobile=False,
                    )  # fmt: skip
                    await tools.call("Page.addScriptToEvaluateOnNewDocument", source=DISMISS_BANNER)
                    await tools.call("Page.navigate", url=args.url)
                    await tools.until(READY, args.timeout, "ComfyUI's frontend did not start")
                    name = json.dumps(Path(args.workflow).name)
                    await tools.evaluate(f"app.loadApiJson({json.dumps(workflow)}, {name})")
                    await tools.evaluate(FIXED_SEEDS)
                    if args.run:
                        await tools.evaluate("app.queuePrompt(0, 1)")
                        shown = " && ".join(
                            f"(app.graph.getNodeById({k})?.imgs?.length > 0)" for k in outputs
                        )
                        await tools.until(shown or "true", args.timeout, "the outputs did not show")
                    await tools.evaluate(
                        "app.extensionManager.command.execute('Comfy.Canvas.FitView')"
                    )
                    await asyncio.sleep(1.0)  # one more frame after fitting the view
                    shot = await tools.call("Page.captureScreenshot", format="png")
                    shown = await tools.evaluate(SHOWN)
            finally:
                _stop_group(browser)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(base64.b64decode(shot["data"]))
    print(json.dumps(shown))


def _stop_group(browser: subprocess.Popen[str]) -> None:
    """SIGTERM Chromium's process group, SIGKILL what is left, and wait until it is gone (its
    renderers write into the profile folder until then)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(browser.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        browser.wait(10)
    deadline = time.monotonic() + 10
    while group_members(browser.pid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        time.sleep(0.1)
    browser.wait()


def _devtools_port(browser: subprocess.Popen[str], timeout: float) -> int:
    """The port Chromium announces on stderr: ``DevTools listening on ws://127.0.0.1:P/…``."""
    assert browser.stderr is not None
    deadline = time.monotonic() + timeout
    for line in browser.stderr:
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            return int(match.group(1))
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"Chromium did not start its DevTools server (status {browser.poll()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the ComfyUI server, http://host:port")
    parser.add_argument("--workflow", required=True, help="an API-format workflow (JSON)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--run", action="store_true", help="queue it and wait for the outputs")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per wait")
    asyncio.run(shoot(parser.parse_args()))


if __name__ == "__main__":
    main()
