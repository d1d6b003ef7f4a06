"""Shared test fixtures: the ../shared folder (CI has it, a user's clone does not) and the GPU marker."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Triton decides interpreter mode for its language helpers when it is first imported, and liger-kernel or
# bitsandbytes may import it before a kernel test module runs: without a GPU, turn the interpreter on before
# anything can import triton. "auto" dispatch would then route every CPU loss through the (slow) interpreter, so
# the default backend of the other tests is the reference; the kernel tests ask for "triton" explicitly.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ALIGNKD_BACKEND", "reference")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("ALIGNKD_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared fixtures; present in CI, absent in a user's clone)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _need(FIXTURES)


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    return _need(FIXTURES / "llama_tokenizer")


@pytest.fixture(scope="session")
def llava_eval_dir() -> Path:
    return _need(FIXTURES / "llava_eval")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
