"""Our `kernels/` package next to bitsandbytes and transformers, which probe for the Hugging Face hub package that is
also called `kernels` (kernels/__init__.py explains).

What the libraries do (bitsandbytes 0.50.2, transformers 5.23):
- bitsandbytes, at import on CPUs with AVX512-BF16 (only there; the test asks bitsandbytes which case it is) (and in its MPS backend): `from kernels import get_kernel` inside
  `try/except Exception`, for an optional fast 4-bit GEMM; on failure it logs a warning and uses its own kernel.
- transformers: `is_kernels_available()` = `importlib.util.find_spec("kernels")`, then the distribution version of
  "kernels", and when no distribution metadata exists it imports the package and reads `__version__` ("N/A" when
  absent, never a viable version). Only when that says True does it `from kernels import CUDAProperties, ...`.

Each check runs in a fresh interpreter started in the repo root, so `kernels` resolves to our package exactly as when
a user runs `python train_alignkd.py` there.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json, sys
{imports}
import torch
import bitsandbytes as bnb
import transformers
from transformers.utils import is_kernels_available
from transformers.utils.import_utils import is_kernels_available as is_kernels_available_2

out = {{}}
spec = importlib.util.find_spec("kernels")
out["kernels_origin"] = spec.origin
out["kernels_file"] = sys.modules["kernels"].__file__ if "kernels" in sys.modules else None
out["bnb_probes"] = bool(bnb.functional.has_avx512bf16())  # bitsandbytes' CPU backend probes only on such CPUs
out["is_kernels_available"] = [is_kernels_available(), is_kernels_available_2()]

# transformers modules that consult the probe import cleanly and a tiny model runs
import transformers.integrations.hub_kernels  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32)
logits = LlamaForCausalLM(cfg)(torch.tensor([[1, 2, 3, 4]])).logits
out["llama_ok"] = bool(torch.isfinite(logits).all()) and list(logits.shape) == [1, 4, 64]

# bitsandbytes NF4 Linear4bit forward on CPU, against the dequantized weight
lin = torch.nn.Linear(64, 32)
q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.bfloat16, quant_type="nf4")
q.load_state_dict(lin.state_dict())
q = q.to("cpu")
x = torch.randn(3, 64, dtype=torch.bfloat16)
with torch.no_grad():
    y = q(x)
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    want = x.float() @ w.t() + lin.bias
out["bnb_quantized"] = bool(getattr(q.weight, "bnb_quantized", False)) and q.weight.dtype == torch.uint8
out["bnb_err"] = float((y.float() - want).abs().max() / want.abs().max())

# the hub API is absent: the probes fail with a plain ImportError
import kernels
try:
    from kernels import get_kernel  # noqa: F401
    out["get_kernel"] = "imported"
except ImportError as e:
    out["get_kernel"] = "ImportError"
out["has_version"] = hasattr(kernels, "__version__")
out["hub_names"] = [n for n in ("get_kernel", "kernelize", "LayerRepository", "CUDAProperties", "Mode")
                    if hasattr(kernels, n)]
out["ours"] = getattr(kernels, "ALIGNKD_LOCAL_KERNELS", False)

# and our API still resolves and runs (reference backend on CPU)
from kernels import attention_alignment_and_focus
from losses import AlignKDLoss  # noqa: F401
q_, k_ = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
tm = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.bool)
vm = torch.tensor([[0, 1, 1, 0, 0, 0]], dtype=torch.bool)
loss, _ = attention_alignment_and_focus(q_, k_, q_, k_, tm, vm, torch.eye(2), torch.zeros(2), backend="reference")
out["our_loss"] = float(loss)
out["our_fn_module"] = attention_alignment_and_focus.__module__
print("RESULT " + json.dumps(out))
"""


def _run(imports: str, probe_first: bool) -> dict:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(line[-1][len("RESULT "):])
    res["stderr"] = proc.stderr
    res["probe_first"] = probe_first
    return res


def _check(res: dict) -> None:
    ours = str(ROOT / "kernels" / "__init__.py")
    assert res["kernels_origin"] == ours  # the hazard is real: from the root, `kernels` is our package
    if res["probe_first"] and not res["bnb_probes"]:
        assert res["kernels_file"] is None  # this CPU lacks AVX512-BF16: bitsandbytes never looked for `kernels`
    else:
        assert res["kernels_file"] == ours
    assert res["is_kernels_available"] == [False, False]
    assert res["llama_ok"]
    assert res["bnb_quantized"] and res["bnb_err"] < 2e-2, res["bnb_err"]
    assert res["get_kernel"] == "ImportError"
    assert not res["has_version"] and res["hub_names"] == [] and res["ours"]
    assert res["our_loss"] >= 0.0 and res["our_fn_module"] == "kernels.dispatch"
    assert "Traceback" not in res["stderr"], res["stderr"][-3000:]
    assert "kernels-community" not in res["stderr"], res["stderr"][-3000:]  # no advice to fetch hub kernels


def test_our_package_first_then_bitsandbytes_and_transformers():
    _check(_run("import kernels", probe_first=False))


def test_bitsandbytes_and_transformers_first_then_our_package():
    """bitsandbytes' import-time probe may be the first to import `kernels`: it must get our package and fail cleanly."""
    _check(_run("", probe_first=True))
