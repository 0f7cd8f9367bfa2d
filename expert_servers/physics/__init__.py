"""Physics expert: MuJoCo scenes simulated and rendered as conditions, constraints and proposals.

Modules: ``scene`` (the validated YAML/JSON schema → MJCF), ``assets`` (files only from the
asset root), ``engine`` (compile, simulate, render offscreen with ``mujoco.Renderer``),
``latents`` (control depth, masks at the latent resolution), ``expert`` (``PhysicsExpert`` and
its per-scene ``SceneView``), ``adapter`` (``PhysicsAdapter``, the ``physics`` backend).
Importing the package sets ``MUJOCO_GL=egl`` unless the environment chose a backend already.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from poegen.expert_servers.physics.adapter import PhysicsAdapter
from poegen.expert_servers.physics.expert import PhysicsExpert, SceneView
from poegen.expert_servers.physics.scene import Limits, Scene

__all__ = ["Limits", "PhysicsAdapter", "PhysicsExpert", "Scene", "SceneView"]
