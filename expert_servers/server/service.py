"""The ``poegen.v1.ExpertService`` servicer: thin transport over ``serving`` and ``models``.

Every method is proto → tensors → data plane → proto. A data-plane RPC (Velocity, LogProb,
Score, VelocityVjp, Propose, Encode, Decode, Schedule, Render) runs its whole body, from decoding the
request to serialising the reply, in one worker thread (``_velocity`` etc., through
:meth:`ExpertServing.call`): the event loop only takes the model and hands over. Replies
carry their tensors as :class:`~poegen.kernel.codec.Serialized` bytes (appended from the
tensor's memory, or written into the client's ``reply_shared_memory`` room when shared memory
is on); :func:`poegen.kernel.transport.add_service` registers the servicer with a serializer
that accepts them. The model a call uses is taken once, at its start (UNAVAILABLE before the
first model), and the reply carries that model's revision. Errors are
:class:`ExpertError`\\ s turned into statuses by :func:`maps_errors`.

With dynamic batching on, Velocity, LogProb and Score are decoded and validated in the worker
as always, then either answered there (the call is alone) or merged with concurrent calls that
share their forward pass (:mod:`~poegen.expert_servers.server.batching`,
:meth:`ExpertServing.call_batched`); each reply still carries its own rows and the revision of
the model the merged batch ran on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from torch import Tensor

from poegen.expert_servers.server.adapter import Condition
from poegen.expert_servers.server.interceptors import check_admin
from poegen.expert_servers.server.models import LoadedModel, ModelManager
from poegen.expert_servers.server.serving import ExpertServing, finite_scalar
from poegen.kernel import codec
from poegen.kernel.codec import Received
from poegen.kernel.errors import ExpertError, maps_errors
from poegen.kernel.experts import LatentLayout
from poegen.kernel.refusal import validate_finite
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import expert_pb2_grpc, tensor_pb2

_STAGES = {
    "queued": pb.LOAD_STAGE_QUEUED,
    "loading": pb.LOAD_STAGE_LOADING,
    "ready": pb.LOAD_STAGE_READY,
}
_MODES = {pb.PROPOSE_MODE_PROPOSE: False, pb.PROPOSE_MODE_PROJECT: True}
Reply = codec.Serialized  # a serialised reply: gRPC sends its bytes as they are


@dataclass(frozen=True, slots=True)
class WireLimits:
    """What the servicer accepts: the message size and shared-memory tensors."""

    max_message_bytes: int
    shared_memory: codec.SharedMemoryReader | None = None
    admin_token: str | None = None


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """``ExpertService`` over a :class:`ModelManager` and an :class:`ExpertServing`."""

    def __init__(self, models: ModelManager, serving: ExpertServing, limits: WireLimits) -> None:
        self._models = models
        self._serving = serving
        self._limits = limits

    def _decode(self, msg: tensor_pb2.Tensor, field: str) -> Tensor:
        return codec.decode(
            msg,
            field=field,
            max_bytes=self._limits.max_message_bytes,
            shared_memory=self._limits.shared_memory,
        )

    def _reply_room(self, request: Any, like: Tensor) -> tensor_pb2.SharedMemoryRef | None:
        """The client's room for a reply shaped like ``like``, checked before any work."""
        if not request.HasField("reply_shared_memory"):
            return None
        reader = self._limits.shared_memory
        if reader is None:
            raise ExpertError.invalid(
                "reply_shared_memory", "shared-memory tensors are not enabled on this end"
            )
        room = request.reply_shared_memory
        reader.check_room(room, like.numel() * like.element_size(), field="reply_shared_memory")
        return room

    def _tensor(self, request: Any, field: str) -> Tensor:
        """The required tensor ``field`` of ``request`` (a :class:`codec.Received`)."""
        if not request.HasField(field):
            raise ExpertError.invalid(field, "required")
        return codec.decode_field(
            request,
            field,
            max_bytes=self._limits.max_message_bytes,
            shared_memory=self._limits.shared_memory,
        )

    @maps_errors
    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeResponse:
        return describe_response(self._models.require(), self._limits, self._serving)

    @maps_errors
    async def Prepare(
        self, request: pb.PrepareRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrepareResponse:
        model = self._models.require()
        handle = await self._serving.prepare(model, self._condition(request.condition))
        return pb.PrepareResponse(handle=handle, revision=model.revision)

    @maps_errors
    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=self._serving.release(request.handle))

    @maps_errors
    async def Velocity(
        self, request: Received[pb.VelocityRequest], context: grpc.aio.ServicerContext
    ) -> Reply:
        return await self._serving.call_batched(self._velocity, self._models.require(), request)

    def _velocity(self, model: LoadedModel, request: Received[pb.VelocityRequest]) -> Any:
        x = self._tensor(request, "x")
        sigma = self._tensor(request, "sigma")
        room = self._reply_room(request, x)

        def finish(v: Tensor) -> Reply:
            reply = pb.VelocityResponse(revision=model.revision)
            return self._serving.reply(reply, "velocity", v, room, self._limits.shared_memory)

        item = self._serving.velocity_item(model, x, sigma, request.handle, finish)
        return self._serving.run_or_defer(item)

    @maps_errors
    async def LogProb(
        self, request: Received[pb.LogProbRequest], context: grpc.aio.ServicerContext
    ) -> Reply:
        return await self._serving.call_batched(self._log_prob, self._models.require(), request)

    def _log_prob(self, model: LoadedModel, request: Received[pb.LogProbRequest]) -> Any:
        x = self._tensor(request, "x")
        sigma = self._tensor(request, "sigma") if request.HasField("sigma") else None

        def finish(out: Tensor) -> Reply:
            reply = pb.LogProbResponse(revision=model.revision)
            return self._serving.reply(reply, "log_prob", out)

        item = self._serving.log_prob_item(model, x, sigma, request.handle, finish)
        return self._serving.run_or_defer(item)

    @maps_errors
    async def Score(
        self, request: Received[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> Reply:
        return await self._serving.call_batched(self._score, self._models.require(), request)

    def _score(self, model: LoadedModel, request: Received[pb.ScoreRequest]) -> Any:
        x = self._tensor(request, "x")
        sigma = self._tensor(request, "sigma")
        room = self._reply_room(request, x)

        def finish(out: Tensor) -> Reply:
            reply = pb.ScoreResponse(revision=model.revision)
            return self._serving.reply(reply, "score", out, room, self._limits.shared_memory)

        item = self._serving.score_item(model, x, sigma, request.handle, finish)
        return self._serving.run_or_defer(item)

    @maps_errors
    async def VelocityVjp(
        self, request: Received[pb.VelocityVjpRequest], context: grpc.aio.ServicerContext
    ) -> Reply:
        return await self._serving.call(self._velocity_vjp, self._models.require(), request)

    def _velocity_vjp(self, model: LoadedModel, request: Received[pb.VelocityVjpRequest]) -> Any:
        x = self._tensor(request, "x")
        sigma = self._tensor(request, "sigma")
        cotangent = self._tensor(request, "cotangent")
        room = self._reply_room(request, x)
        out = self._serving.velocity_vjp(model, x, sigma, cotangent, request.handle)
        reply = pb.VelocityVjpResponse(revision=model.revision)
        return self._serving.reply(reply, "vjp", out, room, self._limits.shared_memory)

    @maps_errors
    async def Propose(
        self, request: Received[pb.ProposeRequest], context: grpc.aio.ServicerContext
    ) -> Reply:
        return await self._serving.call(self._propose, self._models.require(), request)

    def _propose(self, model: LoadedModel, request: Received[pb.ProposeRequest]) -> Reply:
        if request.mode not in _MODES:
            raise ExpertError.invalid(
                "mode", "must be PROPOSE_MODE_PROPOSE or PROPOSE_MODE_PROJECT"
            )
        x = self._tensor(request, "x")
        sigma = self._tensor(request, "sigma")
        room = self._reply_room(request, x)
        out = self._serving.propose(
            model, x, sigma, project=_MODES[request.mode], seed=request.seed, handle=request.handle
        )
        reply = pb.ProposeResponse(revision=model.revision)
        return self._serving.reply(reply, "x", out, room, self._limits.shared_memory)

    @maps_errors
    async def Encode(
        self, request: Received[pb.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> Reply:
        return await self._serving.call(self._encode, self._models.require(), request)

    def _encode(self, model: LoadedModel, request: Received[pb.EncodeRequest]) -> Reply:
        latents = self._serving.encode(model, self._tensor(request, "pixels"))
        return self._serving.reply(pb.EncodeResponse(revision=model.revision), "latents", latents)

    @maps_errors
    async def Decode(
        self, request: Received[pb.DecodeRequest], context: grpc.aio.ServicerContext
    ) -> Reply:
        return await self._serving.call(self._decode_latents, self._models.require(), request)

    def _decode_latents(self, model: LoadedModel, request: Received[pb.DecodeRequest]) -> Reply:
        pixels = self._serving.decode(model, self._tensor(request, "latents"))
        return self._serving.reply(pb.DecodeResponse(revision=model.revision), "pixels", pixels)

    @maps_errors
    async def Schedule(
        self, request: pb.ScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScheduleResponse:
        return await self._serving.call(self._schedule, self._models.require(), request)

    def _schedule(self, model: LoadedModel, request: pb.ScheduleRequest) -> pb.ScheduleResponse:
        shape = tuple(int(n) for n in request.sample_shape)
        sigmas = self._serving.schedule(model, int(request.num_steps), shape)
        return pb.ScheduleResponse(sigmas=sigmas, revision=model.revision)

    @maps_errors
    async def Render(
        self, request: pb.RenderRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenderResponse:
        return await self._serving.call(self._render, self._models.require(), request)

    def _render(self, model: LoadedModel, request: pb.RenderRequest) -> pb.RenderResponse:
        outputs = self._serving.render(model, request.handle, list(request.names))
        reply = pb.RenderResponse(revision=model.revision)
        for name, t in outputs.items():
            reply.tensors[name].CopyFrom(codec.encode(t))
        return reply

    @maps_errors
    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadModelResponse]:
        check_admin(context, self._limits.admin_token)
        async for event in self._models.load(request.model_id, dict(request.options)):
            yield pb.LoadModelResponse(
                stage=_STAGES[event.stage],
                progress=event.progress,
                message=event.message,
                revision=event.revision,
            )

    def _condition(self, msg: pb.Condition) -> Condition:
        tensors = {
            name: validate_finite(
                self._decode(t, f"condition.tensors[{name}]"), f"condition.tensors[{name}]"
            )
            for name, t in msg.tensors.items()
        }
        scalars = {name: finite_scalar(name, value) for name, value in msg.scalars.items()}
        return Condition(
            text=msg.text, tensors=tensors, scalars=scalars, negative_text=msg.negative_text
        )


def describe_response(
    model: LoadedModel, limits: WireLimits, serving: ExpertServing
) -> pb.DescribeResponse:
    """``DescribeResponse`` of the served model."""
    info = model.info
    capabilities = [
        pb.Capability.Value(f"CAPABILITY_{str(c).upper()}") for c in sorted(info.capabilities)
    ]
    if serving.has_autoencoder(model) and pb.CAPABILITY_AUTOENCODER not in capabilities:
        capabilities.append(pb.CAPABILITY_AUTOENCODER)
    return pb.DescribeResponse(
        name=info.name,
        kind=pb.ExpertKind.Value(f"EXPERT_KIND_{str(info.kind).upper()}"),
        capabilities=capabilities,
        sample_shape=list(info.sample_shape or ()),
        max_batch=model.max_batch or 0,
        model_id=model.model_id,
        revision=model.revision,
        latent_space=model.latent_space,
        max_message_bytes=limits.max_message_bytes,
        shared_memory=limits.shared_memory is not None,
        pixel_input=info.pixel_input,
        latent_layout=layout_message(info.latent_layout),
    )


def layout_message(layout: LatentLayout | None) -> pb.LatentLayout | None:
    """``LatentLayout`` on the wire (``None`` stays absent)."""
    if layout is None:
        return None
    return pb.LatentLayout(
        channels=layout.channels,
        packing=layout.packing,
        spatial_compression=layout.spatial_compression,
        temporal_compression=layout.temporal_compression,
        multiple=layout.multiple,
        shift=layout.shift,
        dynamic_shift=dict(layout.dynamic_shift),
    )
