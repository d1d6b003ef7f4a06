"""Host-allocation log for the Triton memory-contract tests: every tensor a torch op returns, with kernels stubbed."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocLog(TorchDispatchMode):
    """Records the shape of every tensor any torch op returns (= everything the host code allocates)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # views and in-place results share an input's storage: not an allocation
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((str(func), tuple(t.shape), t.numel()))
        return out


class NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing (this test checks host allocations only)."""

    def __getitem__(self, grid):
        return lambda *a, **k: None
