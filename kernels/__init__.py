"""alignkd's Align-KD losses: one public API, dispatched to Triton or to the reference.

    attention_alignment_and_focus(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask=None)
        -> (scalar, [B, L] fp32)
    text_focus(q_t, k_t, text_mask, vision_mask, attention_mask=None) -> [B, L] float32
    attention_row_lse(q, k, row_mask, attention_mask=None) -> [B, H, L] float32
    attention_kl_loss(q_t, k_t, q_s, k_s, text_mask, vision_mask, mix, attention_mask=None) -> scalar
    projection_kd_loss(f_t, f_s, weight, bias, focus_idx=None) -> (loss_all, loss_focus)
    logit_kd_loss(h_s, w_s, h_t, w_t, kind="forward", temperature=1.0) -> scalar

Each takes a keyword ``backend="auto"|"triton"|"reference"`` (env ``ALIGNKD_BACKEND``); see ``kernels.dispatch``.
The attention functions also take ``teacher_lse=`` (the teacher's ``attention_row_lse``): then only the vision columns
of k_t are read, which is what the teacher cache stores.
``kernels.reference`` holds the same names in plain PyTorch (the specification); the objective that uses them,
``AlignKDLoss``, is in ``losses/``.

Name clash, on purpose handled here: bitsandbytes and transformers probe for the Hugging Face hub package that is
also called ``kernels`` (bitsandbytes: ``from kernels import get_kernel`` inside try/except; transformers:
``is_kernels_available()`` = find_spec + distribution version, falling back to ``kernels.__version__`` when no
distribution metadata exists). Run from the repo root, those probes find this package. So this package must:
- define none of the hub API (``get_kernel``, ``kernelize``, ``LayerRepository``, ...), so ``from kernels import
  get_kernel`` fails with a plain ImportError that the probes catch;
- define no ``__version__`` (transformers then reads "N/A", which is never a viable version, so
  ``is_kernels_available()`` is False and nothing tries ``from kernels import CUDAProperties, ...``);
- import nothing heavy or circular at import time (no triton, no transformers, no bitsandbytes): the probes import it
  while those libraries are half initialized.
bitsandbytes' failed probe logs a warning that asks to `pip install kernels` (which would fetch a kernel from the hub
at run time, which alignkd never does); this package drops that one message, since it is what caused it.
tests/test_import_hazard.py checks all of this in a subprocess started in the repo root.
"""
from __future__ import annotations

import importlib.metadata as _metadata
import logging as _logging
import warnings as _warnings

from .dispatch import (
    BACKENDS,
    attention_alignment_and_focus,
    attention_kl_loss,
    attention_row_lse,
    chunked_cross_entropy,
    fused_logit_kd_and_ce,
    logit_kd_loss,
    projection_kd_loss,
    resolve_backend,
    text_focus,
)

ALIGNKD_LOCAL_KERNELS = True  # marker: this is alignkd's package, not the Hugging Face hub `kernels`

__all__ = [
    "BACKENDS",
    "attention_alignment_and_focus",
    "attention_kl_loss",
    "attention_row_lse",
    "chunked_cross_entropy",
    "fused_logit_kd_and_ce",
    "logit_kd_loss",
    "projection_kd_loss",
    "resolve_backend",
    "text_focus",
]


def _warn_if_hub_kernels_installed() -> None:
    """If the hub `kernels` distribution is installed, its metadata makes transformers believe the package it imports
    (this one, when run from the repo root) is the hub's: say so clearly instead of failing later in transformers."""
    try:
        dist = _metadata.distribution("kernels")
    except _metadata.PackageNotFoundError:
        return
    except Exception:  # noqa: BLE001 - a metadata oddity must never break the import
        return
    _warnings.warn(
        f"the Hugging Face `kernels` package {dist.version} is installed, but running from the alignkd repo root "
        f"imports alignkd's local `kernels/` package under the same name; transformers/bitsandbytes hub-kernel "
        f"features will not work in this process (pip uninstall kernels, or run from another directory)",
        RuntimeWarning, stacklevel=2)


_warn_if_hub_kernels_installed()


class _NoHubKernelAdvice(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


# installed when bitsandbytes' probe imports this package, before the probe fails and logs
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelAdvice())
