"""Tests run the Triton kernels on the CPU through Triton's interpreter, and the CUDA
kernels on the CPU through their emulator (tests/test_cuda_emu_*.py).

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so this
runs before fused_attn.ops.triton_attention is imported. On a machine with a GPU,
set FUSED_ATTN_TEST_DEVICE=cuda to run the same tests compiled: the interpreter off, and
the CUDA tests on CUDA tensors through the built extension fused_attn._C_cuda instead of
the emulator (FUSED_ATTN_CUDA_EMULATE is cleared). ``DEVICE`` (importable: ``from conftest
import DEVICE``) and the ``device`` fixture say which.
FUSED_ATTN_POISON=1 makes the launchers NaN-fill every output before the kernels run.
"""
import os

import pytest
import torch

DEVICES = ("cpu", "cuda")
DEVICE = os.environ.get("FUSED_ATTN_TEST_DEVICE", "cpu")
if DEVICE not in DEVICES:
    raise pytest.UsageError(f"FUSED_ATTN_TEST_DEVICE must be one of {', '.join(DEVICES)}, got {DEVICE!r}")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    if not torch.cuda.is_available():
        raise pytest.UsageError("FUSED_ATTN_TEST_DEVICE=cuda, but torch sees no CUDA device "
                                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    os.environ.pop("FUSED_ATTN_CUDA_EMULATE", None)
# Kernel outputs start as NaN, so an element a kernel forgets to write fails the test.
os.environ["FUSED_ATTN_POISON"] = "1"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def cuda_emulation(monkeypatch):
    """The CUDA backend's tests: CPU tensors run its kernels through the emulator, CUDA tensors
    through the compiled extension (no emulator switch); outputs poisoned."""
    if DEVICE == "cpu":
        monkeypatch.setenv("FUSED_ATTN_CUDA_EMULATE", "1")
    else:
        monkeypatch.delenv("FUSED_ATTN_CUDA_EMULATE", raising=False)
    monkeypatch.setenv("FUSED_ATTN_POISON", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
