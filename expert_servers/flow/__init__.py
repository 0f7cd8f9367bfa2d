"""Flow experts on diffusers (temporary: the family adapters land next)."""

from poegen.expert_servers.flow.generic import FlowAdapter, FlowModelExpert

__all__ = ["FlowAdapter", "FlowModelExpert"]
