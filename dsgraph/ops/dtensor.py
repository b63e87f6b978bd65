"""DTensor inputs to ``dsgraph::`` ops (tensor parallelism, or an op called on FSDP2's sharded
parameters directly).

No sharding rules yet: the ops run on local tensors. Under FSDP2 the parameters are all-gathered
before forward, so the ops only ever see plain tensors; a DTensor reaching one is a model or
parallelism set-up that has to give the op local tensors, and the error says which input and how
it is placed, instead of DTensor's generic "no sharding strategy registered".
"""
from __future__ import annotations

import torch


def _describe(value) -> str:
    return f"DTensor placements={tuple(value.placements)} mesh={tuple(value.device_mesh.shape)} " \
           f"local {tuple(value.to_local().shape)} of global {tuple(value.shape)}"


def _rejection(op_name: str):
    def rule(_cls, func, _types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        names = [a.name for a in func._schema.arguments]
        bound = {**dict(zip(names, args)), **(kwargs or {})}
        placed = [f"{name}: {_describe(v)}" for name, v in bound.items() if isinstance(v, DTensor)]
        raise NotImplementedError(
            f"dsgraph::{op_name} has no DTensor sharding rule; it got {'; '.join(placed)}. "
            "It runs on local (plain) tensors: under FSDP2 parameters are all-gathered before forward, "
            "so it sees plain tensors; under tensor parallelism give the op local tensors "
            "(use_local_output=True, or .to_local() on its inputs) or leave it out of the DTensor region.")
    return rule


def reject_dtensor(*op_names: str) -> None:
    """Make each ``dsgraph::<name>`` raise a clear error naming its DTensor inputs and placements."""
    if not torch.distributed.is_available() or not hasattr(torch.library, "register_torch_dispatch"):
        return
    from torch.distributed.tensor import DTensor
    for name in op_names:
        torch.library.register_torch_dispatch(f"dsgraph::{name}", DTensor, _rejection(name))
