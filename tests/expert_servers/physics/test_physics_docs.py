"""docs/physics.md as written: the two `poegen serve` commands of "Serving" as processes (the
documented asset root ``/data/assets`` made a temporary folder holding what the page names: a
``flux-depth`` FLUX folder for the autoencoder option, ``meshes/chair.glb``), and the scene of
"Scenes" prepared and rendered by the physics server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import trimesh
from helpers.docs import REPO, docs_section
from helpers.stack import lines_until
from helpers.timing import scaled

from poegen.kernel.remote import RemoteExpert
from poegen.v1 import expert_pb2 as pb

PAGE = "physics.md"


def _scene() -> str:
    text = (REPO / "docs" / PAGE).read_text()
    section = text[text.index("## Scenes") :]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_the_serving_commands_serve_and_the_scene_renders(flow_models, tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    (assets / "meshes").mkdir(parents=True)
    trimesh.creation.box(extents=(0.5, 0.5, 0.9)).export(assets / "meshes" / "chair.glb")
    shutil.copytree(flow_models.path("flux_depth"), assets / "flux-depth")
    commands = docs_section("Serving", PAGE)
    assert [c.split()[:3] for c in commands] == [
        ["poegen", "serve", "physics"],
        ["poegen", "serve", "graphics"],
    ]
    servers = []
    try:
        for command in commands:
            words = command.split("#")[0].replace("/data/assets", str(assets)).split()
            servers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "poegen.clients.cli", *words[1:], "--port", "0"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        addresses = []
        for server in servers:
            line = lines_until(server, "poegen: serving", scaled(180))[-1]
            assert line.startswith("poegen: serving"), line
            addresses.append(line.rsplit(" ", 1)[-1])
        scene = _scene()
        with RemoteExpert.connect(
            addresses[0], condition=pb.Condition(text=scene), deadline_s=scaled(300)
        ) as physics:
            rendered = physics.render(["rgb", "masks", "positions"])
        assert rendered["rgb"].shape == (33, 3, 256, 256)  # frames, width, height as written
        assert rendered["masks"].shape == (33, 3, 256, 256)  # ball, crate, chair
        ball = rendered["positions"][:, 0, 2]
        assert ball[-1] < ball[0] - 0.5  # dropped from 1.2 m, it falls
        with RemoteExpert.connect(addresses[1]) as graphics:
            # the autoencoder option: renders go into FLUX's latent space
            assert graphics.describe().latent_space.startswith("flux")
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=scaled(30))
