"""FSDP2 under torchrun (`train_alignkd.py --shard fsdp`): the student and the Align-KD adapters sharded over the
ranks with torch's `fully_shard`; whole tensors gathered for a checkpoint and cut back into shards on resume.

`fully_shard` keeps the module tree and the parameter names (each parameter becomes a DTensor holding this rank's
rows), so a state dict gathered into whole tensors has the keys and shapes of an unsharded run's: a checkpoint has one
layout however the run that wrote it was split, and any split resumes from it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._pytree import tree_map


def shard_distill_step(step: torch.nn.Module, layers: torch.nn.ModuleList, adapters: torch.nn.Module) -> None:
    """Shard `step` (the student and the adapters as one module) in place: each decoder layer is a unit (its whole
    weights exist during its own forward and backward only), the adapters are one (a unit holds one dtype, and they
    stay fp32 beside a bf16 student), and the root holds the rest (embeddings, projector, final norm, lm_head). Frozen
    parameters (the CLIP) are left out: whole on every rank, like the teacher they feed, which is no part of `step`."""
    for layer in layers:
        fully_shard(layer)
    fully_shard(adapters)
    fully_shard(step, ignored_params={p for p in step.parameters() if not p.requires_grad})
    # a parameter that a rank's micro-batch does not use (the projector on text-only samples) gets a zero gradient
    # there: every rank reduce-scatters the same tensors, or the collectives would not match
    step.set_reduce_scatter_unused_params(True)


def shard_share(module: torch.nn.Module) -> str:
    """"n of m" trained parameters: this rank's shards of them, and their whole count."""
    trained = [p for p in module.parameters() if p.requires_grad]
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in trained)
    return f"{held:,} of {sum(p.numel() for p in trained):,}"


def gather(tree: Any, keep: bool) -> Any:
    """`tree` (state dicts, nested in dicts and lists) with every DTensor gathered into its whole tensor, on the CPU,
    where `keep` (rank 0); None on the other ranks, which drop each gathered tensor at once. Every rank calls it: each
    gather is a collective, taken in the same order everywhere."""
    def whole(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if isinstance(x, DTensor):
            x = x.full_tensor()
        return x.cpu() if keep else None

    out = tree_map(whole, tree)
    return out if keep else None


def placed_like(whole: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `current`: this rank's shard of it (no communication: every rank holds `whole`) where
    `current` is a DTensor, else `whole` unchanged."""
    if not isinstance(current, DTensor):
        return whole
    return distribute_tensor(whole.to(current.device, current.dtype), current.device_mesh, current.placements,
                             src_data_rank=None)


def load_whole(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """module.load_state_dict(state) for whole tensors, whether the module is sharded or not."""
    own = module.state_dict()
    module.load_state_dict({k: placed_like(v, own[k]) if k in own else v for k, v in state.items()})


def optimizer_state_like(state: dict, opt: torch.optim.Optimizer) -> dict:
    """A saved optimizer state dict (whole tensors, parameters numbered in group order) with each per-parameter
    tensor laid out as its parameter, for `opt.load_state_dict`."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: placed_like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() else v
                                   for k, v in s.items()} for i, s in state["state"].items()}}
