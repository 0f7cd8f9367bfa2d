"""poegen-nodes: poegen's Sampler as ComfyUI nodes (PoE Stack, PoE Expert, PoE Sampler).

:mod:`.convert` (ComfyUI values ↔ poegen specs and results) and :mod:`.stacks` import no
ComfyUI; :mod:`.nodes` (the V3 nodes and ``comfy_entrypoint``) runs inside ComfyUI.
"""
