"""Every statement of every Triton kernel executes in the interpreter.

The interpreter runs the kernels' Python source, so a line tracer sees which kernel
statements ran. A handful of calls that cover the code paths (each causal mode, ragged
tails, GQA, Ev != E, the lse gradient, bf16's interpreter upcast, fp16's plain dot, fp32's
fp64 lse, the forward's tensor-descriptor path, windows, key bounds, mask tensors, varlen
sequences, stored key counts and split-KV)
must together execute every statement inside every @triton.jit function.
"""
import ast
import inspect
import sys

import pytest
import torch

import fused_attn
from fused_attn.ops import triton_attention as T
from fused_attn.spec import CausalMode

from attn_cases import check_backend, make_inputs

pytestmark = pytest.mark.skipif(not T.INTERPRETED, reason="line coverage needs the Triton interpreter")


def _kernel_statements():
    """{line: 'function name'} for every statement inside a @triton.jit function of the module."""
    lines = {}
    for obj in vars(T).values():
        fn = getattr(obj, "fn", None)
        if fn is None or getattr(fn, "__module__", None) != T.__name__:
            continue
        src, start = inspect.getsourcelines(fn)
        tree = ast.parse("".join(src))
        for node in ast.walk(tree):
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if isinstance(node, ast.stmt) and not isinstance(node, ast.FunctionDef) and not docstring:
                lines[node.lineno + start - 1] = fn.__name__
    return lines


@pytest.mark.slow  # every kernel under a line tracer
def test_every_kernel_statement_runs(monkeypatch):
    statements = _kernel_statements()
    assert {"_fwd_kernel", "_fwd_inner", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dkdv_inner",
            "_bwd_dq_kernel", "_bwd_dq_inner", "_dot"} <= set(statements.values())
    hit = set()
    path = T.__file__

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == path and event == "line":
            hit.add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)
    try:
        for mode, dtype, lse_grad, tma in [(CausalMode.NONE, torch.float16, False, False),
                                           (CausalMode.UPPER_LEFT, torch.bfloat16, True, False),
                                           (CausalMode.LOWER_RIGHT, torch.float16, False, False),
                                           (CausalMode.UPPER_LEFT, torch.float32, True, False),
                                           (CausalMode.LOWER_RIGHT, torch.float16, False, True)]:
            monkeypatch.setattr(T, "INTERPRETER_TMA", tma)
            q, k, v = make_inputs(1, 4, 2, 70, 45, 40, 24, dtype)
            check_backend("triton", q, k, v, mode, with_lse_grad=lse_grad)
        # a window and key bounds, with causal (their accuracy: tests/test_triton_visibility.py)
        q, k, v = (t.requires_grad_() for t in make_inputs(2, 4, 2, 70, 45, 40, 24, torch.float32))
        keys = torch.arange(45)
        padding = torch.stack([(keys >= 3) & (keys < 30), keys < 40])[:, None, None, :]
        out, lse = fused_attn.attention_with_lse(q, k, v, attn_mask=padding, is_causal=True, window=(20, 2),
                                                 enable_gqa=True, backend="triton")
        (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
        # mask tensors: fp32 float (-inf in places, a row hidden; requiring grad) and a bf16 boolean one with
        # whole tiles hidden and admitted (their accuracy and tile skipping: tests/test_triton_visibility.py)
        biases = torch.randn(2, 4, 70, 45).masked_fill(torch.rand(2, 4, 70, 45) < 0.2, float("-inf"))
        biases[:, :, 3] = float("-inf")
        biases.requires_grad_()  # its gradient (MASK_GRAD; accuracy: tests/test_triton_visibility.py)
        admitted = torch.rand(2, 1, 70, 45) > 0.3
        admitted[..., :32] = False
        admitted[:, :, 32:64, 32:] = True
        for dtype, mask in ((torch.float32, biases), (torch.bfloat16, admitted)):
            q, k, v = make_inputs(2, 4, 2, 70, 45, 40, 24, dtype)
            check_backend("triton", q, k, v, CausalMode.NONE, with_lse_grad=True, attn_mask=mask)
        # varlen sequences, fp32 (top keys), causal with a window; a sequence without queries and a short
        # one leave programs past their sequence's end (accuracy and tiles: tests/test_varlen.py,
        # tests/test_triton_visibility.py)
        cu_q, cu_k = torch.tensor([0, 40, 40, 45]), torch.tensor([0, 70, 80, 120])
        q, k, v = (torch.randn(n, heads, 16, requires_grad=True) for n, heads in ((45, 4), (120, 2), (120, 2)))
        out, lse = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 40, 70, causal=True, window=(20, 0),
                                               return_lse=True, backend="triton")
        (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
        # soft-capping, ALiBi and dropout, fp32 (top keys) and fp16, dense and varlen (keys at packed
        # offsets off a multiple of 4) (accuracy: tests/test_triton_visibility.py, test_triton_dropout.py)
        for dtype in (torch.float32, torch.float16):
            q, k, v = (t.requires_grad_() for t in make_inputs(2, 4, 2, 70, 45, 40, 24, dtype))
            out, lse = fused_attn.attention_with_lse(q, k, v, is_causal=True, enable_gqa=True, softcap=2.0,
                                                     alibi_slopes=torch.rand(4), dropout_p=0.3, backend="triton")
            (out.float().sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
        q, k, v = (torch.randn(n, heads, 16, requires_grad=True) for n, heads in ((45, 4), (120, 2), (120, 2)))
        out, lse = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 40, 70, causal=True, dropout_p=0.3, softcap=2.0,
                                               alibi_slopes=torch.rand(3, 4), return_lse=True, backend="triton")
        (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
        # split-KV (SPLIT: a decoding step's key chunks; accuracy: tests/test_triton.py::test_split_kv)
        monkeypatch.setattr(T, "SPLIT_MIN_KEYS", 64)
        q, k, v = (t.requires_grad_() for t in make_inputs(1, 1, 1, 1, 200, 16, 16, torch.float32))
        out, lse = fused_attn.attention_with_lse(q, k, v, window=(90, 0), backend="triton")
        (out.sum() + lse.sum()).backward()
        # stored key counts (SEQLENS: attention_with_kvcache, forward only; accuracy: tests/test_kvcache.py)
        with torch.no_grad():
            k_cache, v_cache = torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
            fused_attn.attention_with_kvcache(torch.randn(2, 4, 3, 16), k_cache, v_cache, torch.randn(2, 2, 3, 16),
                                              torch.randn(2, 2, 3, 16), cache_seqlens=torch.tensor([5, 40]),
                                              window=(20, 0), backend="triton")
    finally:
        sys.settrace(None)
    missing = sorted(f"{statements[line]}:{line}" for line in statements if line not in hit)
    assert not missing, f"kernel statements never executed: {missing}"
