"""``PhysicsAdapter``: serves :class:`~poegen.expert_servers.physics.expert.PhysicsExpert`.

The model id is a directory under the host's model root: the **asset root**, the only place
scenes and meshes are read from. Options (strings, as on the wire):

* ``autoencoder``: ``"<backend>:<folder>"``, e.g. ``"flux:tiny-flux"``: a model folder *inside
  the asset root* loaded with that ``poegen.backends`` adapter; its expert's ``encode`` maps
  renderings into the latent space the constraint works in (the same VAE, scaling and layout
  as the generative expert's own Encode). Absent: the constraint works on pixels in [-1, 1].
* ``latent_space``: the announced latent space (default: the autoencoder's).
* ``weight``: default w of the Gaussian tie (1).
* ``mask_mode``: ``fraction`` (default), ``any`` or ``all`` (see ``physics.latents``).
* ``moves``: ``propose`` (default), ``project``, ``both`` or ``none``.
* ``tie``: ``weights`` (default: the Gaussian tie's log-potential enters the SMC weights) or
  ``score`` (its exact noised score joins the MCMC moves; see :mod:`poegen.kernel.sampler`).
* ``max_frames``, ``max_side``, ``max_objects``: bounds of one job (256, 1024, 64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from poegen.expert_servers.physics.assets import resolve_asset  # noqa: F401  (re-export)
from poegen.expert_servers.physics.expert import MOVES, TIES, PhysicsExpert
from poegen.expert_servers.physics.latents import MASK_MODES
from poegen.expert_servers.physics.scene import Limits
from poegen.expert_servers.server.adapter import ModelRef, Progress, ServedModel
from poegen.kernel.refusal import ExpertError

OPTIONS = ("autoencoder", "latent_space", "weight", "mask_mode", "moves", "tie", "max_frames",
           "max_side", "max_objects")  # fmt: skip


def _number(options: Mapping[str, str], name: str, default: float) -> float:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ExpertError.invalid(f"options[{name}]", f"{raw!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ExpertError.invalid(f"options[{name}]", "must be positive and finite")
    return value


def _integer(options: Mapping[str, str], name: str, default: int) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ExpertError.invalid(f"options[{name}]", f"{raw!r} is not a positive integer")
    return int(raw)


def _choice(options: Mapping[str, str], name: str, choices, default: str) -> str:
    value = options.get(name, default)
    if value not in choices:
        raise ExpertError.invalid(f"options[{name}]", f"{value!r}, expected one of {list(choices)}")
    return value


def load_autoencoder(ref: ModelRef, spec: str, progress: Progress) -> ServedModel:
    """The served model of ``"<backend>:<folder>"``, the folder inside the asset root."""
    from poegen.expert_servers.server.backends import UnknownBackendError, create_adapter

    backend, sep, folder = spec.partition(":")
    if not sep or not backend or not folder:
        raise ExpertError.invalid("options[autoencoder]", "expected '<backend>:<folder>'")
    assert ref.path is not None
    root = ref.path.resolve()
    path = (root / folder).resolve()
    if folder.startswith("/") or ".." in folder.split("/") or not path.is_relative_to(root):
        raise ExpertError.invalid("options[autoencoder]", "the folder must lie in the asset root")
    if not path.is_dir():
        raise ExpertError.invalid("options[autoencoder]", f"no folder {folder!r} in the asset root")
    try:
        adapter = create_adapter(backend)
    except UnknownBackendError as e:
        raise ExpertError.invalid("options[autoencoder]", str(e)) from None
    served = adapter.load(ModelRef(f"{ref.model_id}/{folder}", path), {}, progress)
    if not callable(getattr(served.expert, "encode", None)):
        raise ExpertError.invalid("options[autoencoder]", f"{backend!r} models have no encode")
    return served


class PhysicsAdapter:
    """Loads a physics expert for an asset-root directory (see the module docstring)."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ExpertError.invalid(
                f"options[{unknown[0]}]", f"unknown (known: {', '.join(OPTIONS)})"
            )
        if ref.path is None or not ref.path.is_dir():
            raise ExpertError.invalid("model_id", f"{ref.model_id!r} is not an asset directory")
        default = Limits()
        limits = replace(
            default,
            max_frames=_integer(options, "max_frames", default.max_frames),
            max_side=_integer(options, "max_side", default.max_side),
            max_objects=_integer(options, "max_objects", default.max_objects),
        )
        autoencoder, latent_space = None, ""
        if "autoencoder" in options:
            served = load_autoencoder(ref, options["autoencoder"], progress)
            autoencoder, latent_space = served.expert, served.latent_space
        expert = PhysicsExpert(
            ref.path,
            limits=limits,
            autoencoder=autoencoder,  # type: ignore[arg-type]
            latent_space=options.get("latent_space", latent_space),
            weight=_number(options, "weight", 1.0),
            mask_mode=_choice(options, "mask_mode", MASK_MODES, "fraction"),  # type: ignore[arg-type]
            moves=_choice(options, "moves", tuple(MOVES), "propose"),
            tie=_choice(options, "tie", tuple(TIES), "weights"),
            model_id=ref.model_id,
        )
        progress(1.0, "physics ready")
        return ServedModel(expert, latent_space=expert.latent_space, concurrent=False)  # MuJoCo
