"""The node pack (ComfyUI's V3 node schema): PoE Stack, PoE Expert, PoE Sampler.

::

    PoE Stack ──stack──────────────────────────────┐
    PoE Expert ──experts─┐                          ├─▶ PoE Sampler ──IMAGE──▶ SaveImage
    PoE Expert ──experts─┴─(experts_1, experts_2)──┘               └─LATENT

* **PoE Stack** (``PoeStack``) starts a local stack (a stack file, or ``digits``: poegen's
  shipped digit experts) or reaches a running one (``endpoints``: ``sampler = host:port`` and
  ``name = host:port`` lines); gives ``POE_STACK`` and shows the endpoints.
* **PoE Expert** (``PoeExpert``) is one factor of the product: an endpoint (``host:port`` or a
  name of the stack), a weight, an optional region (a MASK or a box) and a condition (text, an
  IMAGE as a named tensor). ``POE_EXPERT`` carries the list of experts so far: an expert
  appends itself to its optional ``experts`` input, so experts chain as well as fan in.
* **PoE Sampler** (``PoeSampler``) runs the product on the Sampler service through poegen's
  SDK (:class:`poegen.clients.sdk.AsyncClient`): seed, particles, levels, MCMC steps, preset
  and any further ``SamplerSettings`` as JSON. It gives IMAGE (the samples of highest weight,
  decoded by the Sampler's generative expert: ComfyUI loads no model) and LATENT (their
  particles), reports each level through ComfyUI's progress API (with the best particle's
  clean estimate as a preview when it is pixels), and cancels the job when the queue is
  interrupted (the gRPC stream is cancelled, which cancels the job on the Sampler).

Errors: bad inputs fail the prompt's validation where they can be checked alone (``box``,
``settings``, ``endpoints``); errors of the Sampler and of the spec fail the PoE Sampler with a
message naming the node, its input and the spec's field (``experts[1].condition.text``).
Conversions between ComfyUI's tensors and poegen's are in :mod:`.convert`.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import comfy.model_management
from comfy_api.latest import ComfyAPI, ComfyExtension, io, ui

from poegen.clients.stack import StackError, wait_serving

from .convert import (
    ExpertEntry,
    NodeError,
    StackHandle,
    build_spec,
    comfy_images,
    comfy_latent,
    format_endpoints,
    image_condition,
    node_error,
    parse_box,
    parse_endpoints,
    parse_settings,
    parse_shape,
    preview_image,
    summary,
)
from .stacks import DIGITS, KEEPER

PoeExpertType = io.Custom("POE_EXPERT")
PoeStackType = io.Custom("POE_STACK")
CATEGORY = "poegen"
INTERRUPT_POLL_S = 0.1  # how often a running job looks at ComfyUI's interrupt flag
CONNECT_TIMEOUT_S = 10.0  # a reached Sampler must answer its health check within this


class PoeStack(io.ComfyNode):
    """Start or reach a local poegen stack (see the module docstring)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PoeStack",
            display_name="PoE Stack",
            category=CATEGORY,
            description="Start a local poegen stack (expert servers + Sampler) or reach one.",
            inputs=[
                io.Combo.Input(
                    "action",
                    options=["start", "connect"],
                    default="start",
                    tooltip="start: run stack_file's processes; connect: use endpoints",
                ),
                io.String.Input(
                    "stack_file",
                    default=DIGITS,
                    tooltip=f"start: a stack YAML file, or {DIGITS!r} (poegen's digit experts)",
                ),
                io.String.Input(
                    "endpoints",
                    default="sampler = 127.0.0.1:50050",
                    multiline=True,
                    tooltip="connect: 'sampler = host:port' and 'name = host:port' lines",
                ),
            ],
            outputs=[PoeStackType.Output(display_name="stack")],
        )

    @classmethod
    def validate_inputs(cls, endpoints: str) -> bool | str:
        # blank (start needs none) or linked from another node: checked when connect runs
        if not isinstance(endpoints, str) or not endpoints.strip():
            return True
        try:
            parse_endpoints(endpoints)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, action: str, stack_file: str, endpoints: str) -> Any:
        # a started stack that died must start again, though the inputs did not change
        if action == "start":
            with contextlib.suppress(ValueError):  # a missing file: execute says so
                return (action, KEEPER.fingerprint(stack_file))
        return (action, stack_file, endpoints)

    @classmethod
    def execute(cls, action: str, stack_file: str, endpoints: str) -> io.NodeOutput:
        if action == "start":
            try:
                started = KEEPER.start(stack_file).endpoints
            except (StackError, ValueError, OSError) as e:  # SpecError is a ValueError
                raise NodeError(f"input 'stack_file' ({stack_file}): {e}") from None
            if started.sampler is None:
                raise NodeError(f"input 'stack_file' ({stack_file}): the stack has no sampler")
            handle = StackHandle(started.sampler, dict(started.experts))
        else:
            try:
                handle = parse_endpoints(endpoints)
            except ValueError as e:
                raise NodeError(f"input 'endpoints': {e}") from None
            _check_serving(handle.sampler)
        return io.NodeOutput(handle, ui=ui.PreviewText(format_endpoints(handle)))


def _check_serving(address: str) -> None:
    if not wait_serving(address, deadline=time.monotonic() + CONNECT_TIMEOUT_S):
        raise NodeError(f"input 'endpoints': the Sampler at {address} is not SERVING")


class PoeExpert(io.ComfyNode):
    """One factor of the product (see the module docstring)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PoeExpert",
            display_name="PoE Expert",
            category=CATEGORY,
            description="A factor of the product: an expert server, its weight, region and "
            "condition. Chain experts through 'experts'.",
            inputs=[
                io.String.Input(
                    "endpoint", default="all", tooltip="host:port, or an endpoint name of the stack"
                ),
                io.Float.Input(
                    "weight",
                    default=1.0,
                    min=-1000.0,
                    max=1000.0,
                    step=0.05,
                    tooltip="exponent of a generative expert; scale of a reward or constraint",
                ),
                io.String.Input(
                    "text", default="", multiline=True, tooltip="condition text (prompt, label)"
                ),
                io.String.Input(
                    "box",
                    default="",
                    tooltip="region: [start, stop) per trailing sample dimension, "
                    "e.g. [[0, 16], [0, 8]]; empty: everywhere (or the mask)",
                ),
                io.String.Input(
                    "image_name",
                    default="image",
                    tooltip="the condition tensor the image becomes (e.g. control_image)",
                ),
                io.Combo.Input(
                    "image_mode",
                    options=["RGB", "L"],
                    default="RGB",
                    tooltip="channels of the condition image: RGB, or L (one gray channel)",
                ),
                io.Mask.Input("mask", optional=True, tooltip="region mask (resized to the sample)"),
                io.Image.Input("image", optional=True, tooltip="condition image in [0, 1]"),
                PoeExpertType.Input("experts", optional=True, tooltip="the experts so far"),
            ],
            outputs=[PoeExpertType.Output(display_name="experts")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, box: str) -> bool | str:
        if not isinstance(box, str):  # linked from another node: checked when it runs
            return True
        try:
            parse_box(box)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(
        cls,
        endpoint: str,
        weight: float,
        text: str,
        box: str,
        image_name: str,
        image_mode: str,
        mask: Any = None,
        image: Any = None,
        experts: tuple[ExpertEntry, ...] | None = None,
    ) -> io.NodeOutput:
        node = str(cls.hidden.unique_id)
        if not endpoint.strip():
            raise NodeError(f"node {node} input 'endpoint': empty (give host:port or a name)")
        if box.strip() and mask is not None:
            raise NodeError(f"node {node} inputs 'box' and 'mask': give one region, not both")
        try:
            condition = None if image is None else image_condition(image, image_mode)
        except ValueError as e:
            raise NodeError(f"node {node} input 'image': {e}") from None
        entry = ExpertEntry(
            node_id=node,
            endpoint=endpoint.strip(),
            weight=weight,
            text=text,
            box=parse_box(box),
            mask=None if mask is None else mask.float().cpu(),
            image=condition,
            image_name=image_name.strip() or "image",
        )
        return io.NodeOutput((*(experts or ()), entry))


class PoeSampler(io.ComfyNode):
    """The product on the Sampler service (see the module docstring)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        more = [
            PoeExpertType.Input(f"experts_{k}", optional=True, tooltip="more experts")
            for k in (2, 3, 4)
        ]
        return io.Schema(
            node_id="PoeSampler",
            display_name="PoE Sampler",
            category=CATEGORY,
            description="Sample the product of the experts with poegen's Sampler (SMC + MCMC).",
            inputs=[
                PoeStackType.Input("stack"),
                PoeExpertType.Input("experts_1", tooltip="experts of the product"),
                *more,
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True
                ),
                io.Int.Input("particles", default=16, min=1, max=1 << 20, tooltip="N"),
                io.Int.Input("levels", default=16, min=1, max=10_000, tooltip="noise levels"),
                io.Int.Input("mcmc_steps", default=1, min=0, max=1000, tooltip="per level"),
                io.Combo.Input("preset", options=["default", "paper"], default="default"),
                io.String.Input(
                    "sample_shape",
                    default="",
                    tooltip="the sample's shape, e.g. 1, 16, 16 (C, H, W); empty: the experts' own",
                ),
                io.Int.Input(
                    "samples",
                    default=4,
                    min=0,
                    max=1 << 20,
                    tooltip="images given, highest weight first; 0: every particle",
                ),
                io.String.Input(
                    "settings",
                    default="{}",
                    multiline=True,
                    tooltip='further SamplerSettings as JSON, e.g. {"step_size": 0.2}',
                ),
                io.Boolean.Input("previews", default=True, tooltip="a preview at every level"),
            ],
            outputs=[io.Latent.Output(), io.Image.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, settings: str) -> bool | str:
        # ComfyUI files a failure under every input this method takes: so one input only
        # (sample_shape is checked when the node runs)
        if not isinstance(settings, str):  # linked from another node: checked when it runs
            return True
        try:
            parse_settings(settings)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    async def execute(
        cls,
        stack: StackHandle,
        experts_1: tuple[ExpertEntry, ...],
        seed: int,
        particles: int,
        levels: int,
        mcmc_steps: int,
        preset: str,
        sample_shape: str,
        samples: int,
        settings: str,
        previews: bool,
        experts_2: tuple[ExpertEntry, ...] | None = None,
        experts_3: tuple[ExpertEntry, ...] | None = None,
        experts_4: tuple[ExpertEntry, ...] | None = None,
    ) -> io.NodeOutput:
        from poegen.clients.errors import PoegenError
        from poegen.clients.files import SpecError
        from poegen.clients.sdk import AsyncClient, GenerationResult

        node = str(cls.hidden.unique_id)
        experts = [e for group in (experts_1, experts_2, experts_3, experts_4) for e in group or ()]
        # ComfyUI 0.3.75 declares ComfyAPI().execution without creating it; later ones create it
        progress = getattr(ComfyAPI(), "execution", None) or ComfyAPI.Execution()
        parsed: dict[str, Any] = {}
        for name, value, parse in (
            ("sample_shape", sample_shape, parse_shape),
            ("settings", settings, parse_settings),
        ):
            try:
                parsed[name] = parse(value)
            except ValueError as e:
                raise NodeError(f"node {node} input '{name}': {e}") from None
        result = None
        with tempfile.TemporaryDirectory(prefix="poegen-nodes-") as files:
            try:
                spec = build_spec(
                    experts, seed=seed, particles=particles, levels=levels,
                    mcmc_steps=mcmc_steps, preset=preset, samples=samples, previews=previews,
                    files=Path(files), **parsed,
                )  # fmt: skip
                async with AsyncClient(stack.sampler, endpoints=stack.experts) as client:
                    async for event in _interruptible(client.stream(spec)):
                        if isinstance(event, GenerationResult):
                            result = event
                            continue
                        await progress.set_progress(
                            event.step + 1,
                            event.total or levels,
                            preview_image=preview_image(event.preview),
                        )
            except (PoegenError, SpecError) as e:
                raise node_error(e, experts, node) from None
        assert result is not None
        images = comfy_images(result)
        return io.NodeOutput(comfy_latent(result), images, ui=ui.PreviewText(summary(result)))


async def _interruptible(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``events``, until ComfyUI's queue is interrupted: then the stream is closed (its gRPC
    call cancelled, and with it the job on the Sampler) and ComfyUI's interrupt raised."""
    try:
        while True:
            step = asyncio.ensure_future(anext(events))
            while not step.done():
                await asyncio.wait({step}, timeout=INTERRUPT_POLL_S)
                if comfy.model_management.processing_interrupted():
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    comfy.model_management.throw_exception_if_processing_interrupted()
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        await events.aclose()


class PoegenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [PoeStack, PoeExpert, PoeSampler]


async def comfy_entrypoint() -> PoegenExtension:
    """ComfyUI's entry to the node pack (V3)."""
    return PoegenExtension()
