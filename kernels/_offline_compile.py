"""Compile the alignkd Triton kernels for a GPU architecture without a GPU; report shared memory and registers.

    python -m kernels._offline_compile --sm 86 --sm 90

Runs the real host code (``attention_alignment_triton``, ``text_focus_triton``, ``attention_kl_triton``,
``projection_kd_triton``) on CPU tensors of the real shapes (MobileVLM V2 layer 0: 32/16 heads, head dim 128,
L=2048, 144 vision tokens; projection 4096 -> 2048) with every kernel launch replaced by ``JITFunction.warmup``
against a stand-in driver that reports the requested target. So each kernel is compiled, down to a cubin, with
exactly the specializations (block sizes, dtypes, strides) a real launch would get, for bf16 and fp32 inputs. Exit
status 1 if any kernel needs more than SMEM_LIMIT (99 KB: RTX 3090/4090) of shared memory; 3 if this triton version
lacks the internals used here.

Must run in a fresh process without TRITON_INTERPRET (tests/test_triton_kernels.py starts it as a subprocess).
Uses triton internals (driver.set_active, JITFunction.warmup); checked with triton 3.9.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sm", type=int, action="append", help="compute capability, e.g. 86 (default: 86)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing")
        return 3
    import torch
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        JITFunction.warmup  # noqa: B018
        driver.set_active  # noqa: B018
    except (ImportError, AttributeError) as e:
        print(f"triton {triton.__version__}: internals not available ({e})")
        return 3

    from . import _lse, attention_alignment as aa, attention_kl as akl, projection_kd as pk

    sm_holder = {"sm": 86}

    class _Driver:  # just enough of a driver for JITFunction.run(warmup=True)
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", sm_holder["sm"], 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    compiled = []
    orig_getitem = JITFunction.__getitem__

    def _getitem(self, grid):
        def go(*a, **k):
            kern = self.warmup(*a, grid=grid, **k)
            compiled.append((self.fn.__name__, k, kern))
        return go

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

    def usage(kern):
        tool = os.path.join(bin_dir, "cuobjdump")
        if "cubin" not in kern.asm or not os.path.exists(tool):
            return "-", "-"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kern.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
        return m.groups() if m else ("-", "-")

    def attention(dt, B=2, L=2048, ht=32, hs=16, d=128):
        q_t = torch.zeros(B, ht, L, d, dtype=dt)
        k_t = torch.zeros_like(q_t)
        q_s = torch.zeros(B, hs, L, d, dtype=dt, requires_grad=True)
        k_s = torch.zeros_like(q_s, requires_grad=True)
        tm = torch.zeros(B, L, dtype=torch.bool)
        vm = torch.zeros_like(tm)
        am = torch.ones_like(tm)
        vm[:, 35:179] = True
        tm[:, 179:] = True
        am[-1, L - 100:] = False
        tm[-1, L - 100:] = False
        w = torch.zeros(hs, ht, requires_grad=True)
        b = torch.zeros(hs, requires_grad=True)
        aa.attention_alignment_triton(q_t, k_t, q_s, k_s, tm, vm, w, b, am, need_focus=True)
        aa.text_focus_triton(q_t, k_t, tm, vm, am)
        akl.attention_kl_triton(q_t, k_t, q_s, k_s, tm, vm, w, am)

    def projection(B=2):
        f_t = torch.zeros(B, 144, 4096, dtype=torch.bfloat16)
        f_s = torch.zeros(B, 144, 2048, dtype=torch.bfloat16, requires_grad=True)
        w = torch.zeros(2048, 4096, requires_grad=True)
        b = torch.zeros(2048, requires_grad=True)
        la, lf = pk.projection_kd_triton(f_t, f_s, w, b, torch.zeros(B, 16, dtype=torch.long))
        (la + lf).backward()

    worst = 0
    JITFunction.__getitem__ = _getitem
    try:
        for sm in args.sm or [86]:
            sm_holder["sm"] = sm
            driver.set_active(_Driver())
            for fn in (_lse._row_lse_kernel, aa._align_kernel, aa._dk_kernel, akl._vision_lse_kernel,
                       akl._kl_kernel, pk._proj_fwd_kernel, pk._proj_bwd_kernel):
                fn.device_caches.clear()  # the binder caches the target per device
            compiled.clear()
            for dt in (torch.bfloat16, torch.float32):
                attention(dt)
            projection()
            print(f"sm_{sm} (triton {triton.__version__}); limit {_lse.SMEM_LIMIT} B")
            print(f"  {'kernel':<18} {'dots':<8} {'blocks':<34} {'warps':>5} {'shared B':>9} {'regs':>5} {'stack':>5}")
            seen = set()
            for name, k, kern in compiled:
                blocks = ",".join(f"{a[6:]}={v}" for a, v in k.items() if a.startswith("BLOCK_") and a[6] != "D")
                if "HS_G" in k:
                    blocks += f",HS_G={k['HS_G']}" + (" focus-only" if k.get("NEED_FOCUS") and not k.get("NEED_LOSS")
                                                      else "")
                prec = k.get("PREC", k.get("PREC_S", ""))
                key = (name, blocks, prec)
                if key in seen:
                    continue
                seen.add(key)
                regs, stack = usage(kern)
                worst = max(worst, kern.metadata.shared)
                print(f"  {name:<18} {'fp32' if prec == 'ieee' else 'bf16':<8} {blocks:<34} "
                      f"{k.get('num_warps', 4):>5} {kern.metadata.shared:>9} {regs:>5} {stack:>5}")
    finally:
        JITFunction.__getitem__ = orig_getitem
    ok = worst <= _lse.SMEM_LIMIT
    print(f"max shared memory {worst} B: {'fits' if ok else 'EXCEEDS'} {_lse.SMEM_LIMIT} B")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
