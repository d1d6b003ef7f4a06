"""fp32 master weights for a bf16 student, stepped chunk by chunk so no full fp32 gradient copy ever exists.

At MobileVLM's learning rates most AdamW updates of bf16 weights round away (`python bench/bf16_updates.py` measures
how many), so a bf16 student trains on fp32 copies, 4 bytes per trainable parameter. The optimizer holds the copies; gradients are cast per chunk of about `chunk_bytes`, the optimizer is
stepped on that chunk (optimizers skip parameters whose grad is None), and the result is written back in bf16.
"""
from __future__ import annotations

import torch


class MasterWeights:
    def __init__(self, groups: list[dict], chunk_bytes: int = 256 * 2**20):
        self.chunk_bytes = chunk_bytes
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self.groups = []
        for g in groups:
            params = []
            for p in g["params"]:
                m = p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, m))
                params.append(m)
            self.groups.append({**g, "params": params})

    def masters(self) -> list[torch.Tensor]:
        return [m.detach() for p, m in self.pairs if m is not p]

    def load_masters(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for (p, m), t in zip(((p, m) for p, m in self.pairs if m is not p), tensors, strict=True):
                m.copy_(t)
                p.copy_(t)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = {id(m): p.grad for p, m in self.pairs if p.grad is not None}
        for p, m in self.pairs:
            p.grad = None
            m.grad = None
        chunk, size = [], 0
        for p, m in self.pairs:
            g = grads.get(id(m))
            if g is None:
                continue
            m.grad = g.float()
            chunk.append((p, m))
            size += m.numel() * 4
            if size >= self.chunk_bytes:
                self._flush(optimizer, chunk)
                chunk, size = [], 0
        if chunk:
            self._flush(optimizer, chunk)

    @staticmethod
    def _flush(optimizer: torch.optim.Optimizer, chunk: list) -> None:
        optimizer.step()
        for p, m in chunk:
            m.grad = None
            if m is not p:
                p.copy_(m)
