"""Tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so this
runs before fused_attn.ops.triton_attention is imported. On a machine with a GPU,
set FUSED_ATTN_TEST_DEVICE=cuda to run the same tests compiled (interpreter off).
FUSED_ATTN_POISON=1 makes the launchers NaN-fill every output before the kernels run.
"""
import os

import pytest
import torch

DEVICE = os.environ.get("FUSED_ATTN_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
# Kernel outputs start as NaN, so an element a kernel forgets to write fails the test.
os.environ["FUSED_ATTN_POISON"] = "1"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
