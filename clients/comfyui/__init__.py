"""poegen-nodes as a ComfyUI custom node pack: ComfyUI imports this folder and calls
``comfy_entrypoint`` (V3 node schema). The nodes are in :mod:`poegen_nodes.nodes`."""

from .poegen_nodes.nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
