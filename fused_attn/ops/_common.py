"""Small helpers shared by the kernel backends' launchers."""
from __future__ import annotations

import os
import warnings

import torch

POISON_ENV = "FUSED_ATTN_POISON"


def new_output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised output tensor; NaN-filled when FUSED_ATTN_POISON=1 (the tests set it),
    so any element a kernel forgets to write shows up as NaN."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides but need unit stride on the last (head) dim."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def allow_tf32() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls (torch's new or legacy setting)."""
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if new != "none":
        return new == "tf32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.get_float32_matmul_precision() != "highest"
        except RuntimeError:
            return False


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_forward(q, k, v, causal, scale):
    """Shapes of a backend's forward op (out (B, H, L, Ev), lse (B, H, L)), for torch.compile."""
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[3])), q.new_empty((B, H, L), dtype=lse_dtype(q.dtype))


def fake_backward(dout, dlse, q, k, v, out, lse, causal, scale):
    """Shapes of a backend's backward op (contiguous dq, dk, dv), for torch.compile."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
