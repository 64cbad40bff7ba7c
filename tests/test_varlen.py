"""fused_attn.varlen_attention: variable-length sequences packed along the rows, FlashAttention-2's
``flash_attn_varlen_func`` semantics (causal and window aligned bottom-right per sequence).

The oracle is ``reference.varlen_attention``, which runs ``reference.attention`` on each sequence
alone (in fp64; and in the inputs' dtype for the tolerance rule's floor). The CPU kernels run the
packed problem as one batch whose rows each see their own sequence's keys (Visibility in
csrc/common/attn_params.h); every case is checked forward, lse and backward.
"""
import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn.problem import make_varlen_problem
from fused_attn.spec import CausalMode
from fused_attn.testing import assert_close, stores_bf16_by_truncation

HQ, HK, E, EV = 4, 2, 32, 24

LENGTHS = {  # id -> per sequence (query length, key length)
    "self_with_empty_and_one": [(5, 5), (0, 0), (17, 17), (113, 113), (1, 1)],
    "cross_lengths_differ": [(3, 40), (17, 1), (0, 5), (64, 203), (9, 0)],
    "across_cpu_blocks": [(600, 600), (130, 1100), (7, 7)],
    "one_sequence": [(203, 97)],
    "awkward_1023": [(1023, 1023), (1, 1023), (1023, 17)],
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _packed(lengths, dtype, gen):
    """q, k, v packed (total, H, E) and the cumulative offsets (int32, as FlashAttention takes them)."""
    lq, lk = [a for a, _ in lengths], [b for _, b in lengths]
    cu = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(sum(lq), HQ, E, generator=gen, dtype=draw).to(dtype)
    k = torch.randn(sum(lk), HK, E, generator=gen, dtype=draw).to(dtype)
    v = torch.randn(sum(lk), HK, EV, generator=gen, dtype=draw).to(dtype)
    return q, k, v, cu(lq), cu(lk), max(lq), max(lk)


def _run(fn, q, k, v, gen_seed):
    """out, lse and the gradients of sum(out * dout) + sum(lse * dlse) (lse's -inf left out)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    g = torch.Generator().manual_seed(gen_seed)
    dout = torch.randn(out.shape, generator=g).to(q.dtype).double()
    dlse = torch.randn(lse.shape, generator=g).double()
    total = (out.double() * dout).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * dlse).sum()
    grads = torch.autograd.grad(total, leaves) if total.requires_grad else [torch.zeros_like(t) for t in leaves]
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (out.detach(), lse.detach(), *grads)))


def _oracle(compute_dtype, cu_q, cu_k, causal, window=(-1, -1), dropout_p=0.0, **extra):
    """reference.varlen_attention on packed (total, H, E) inputs (``extra``: its alibi_slopes, softcap,
    dropout_seed), its results in varlen_attention's layout."""
    mode = CausalMode.LOWER_RIGHT if causal else CausalMode.NONE

    def fn(q, k, v):
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out, lse = reference.varlen_attention(q4, k4, v4, cu_q.long(), cu_k.long(), dropout_p, mode,
                                              window=window, compute_dtype=compute_dtype, **extra)
        return out[0].transpose(0, 1), lse[0].float() if compute_dtype != torch.float64 else lse[0]
    return fn


MODES = {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "window8_2": (False, (8, 2)),
         "causal_window30": (True, (30, 0))}
# Every combination, but the 1023-long sequences (CI time) only causal windowed in fp32 and bf16.
CPU_CASES = [pytest.param(lengths, *MODES[mode], dtype, id=f"{lengths}-{mode}-{str(dtype).replace('torch.', '')}")
             for lengths in LENGTHS for mode in MODES for dtype in DTYPES
             if lengths != "awkward_1023" or (mode == "causal_window30" and dtype in (torch.float32, torch.bfloat16))]


@pytest.mark.parametrize("lengths,causal,window,dtype", CPU_CASES)
def test_varlen_cpu_matches_each_sequence_alone(lengths, causal, window, dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v, cu_q, cu_k, mq, mk = _packed(LENGTHS[lengths], dtype, gen)
    p = make_varlen_problem(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window)
    assert p.features() >= {"varlen"} and p.q.shape == (1, HQ, q.shape[0], E)

    def ours(q, k, v):
        return fused_attn.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window=window,
                                           return_lse=True, backend="cpu")
    got = _run(ours, q, k, v, 5)
    ref = _run(_oracle(torch.float64, cu_q, cu_k, causal, window), q, k, v, 5)
    base = _run(_oracle(None, cu_q, cu_k, causal, window), q, k, v, 5)
    assert got["out"].shape == (q.shape[0], HQ, EV) and got["out"].is_contiguous()
    assert got["lse"].shape == (HQ, q.shape[0])
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close(got[name], ref[name], base[name], name, dtype=q.dtype if name == "lse" else None)


# The Triton kernels under the interpreter are slow: fewer cases, blocks of 32 rows and keys
# (INTERPRETER_BLOCKS) so the last case still crosses several, one query block per short sequence.
TRITON_LENGTHS = {name: LENGTHS[name] for name in ("self_with_empty_and_one", "cross_lengths_differ")}
TRITON_LENGTHS["across_triton_blocks"] = [(100, 100), (40, 170), (7, 7)]


# fp32: every length case with causal and with a window; full and causal + window on the longest; bf16 on
# two (the interpreter is slow: CI time).
TRITON_CASES = ([(torch.float32, name, True, (-1, -1)) for name in TRITON_LENGTHS]
                + [(torch.float32, name, False, (8, 2)) for name in TRITON_LENGTHS]
                + [(torch.float32, "across_triton_blocks", False, (-1, -1)),
                   (torch.float32, "across_triton_blocks", True, (30, 0)),
                   (torch.bfloat16, "cross_lengths_differ", True, (-1, -1)),
                   (torch.bfloat16, "across_triton_blocks", False, (8, 2))])


@pytest.mark.parametrize("dtype,lengths,causal,window", TRITON_CASES,
                         ids=[f"{str(d).replace('torch.', '')}-{n}-{'causal' if c else 'full'}-w{w[0]}_{w[1]}"
                              for d, n, c, w in TRITON_CASES])
def test_varlen_triton_matches_each_sequence_alone(device, lengths, causal, window, dtype):
    """The Triton kernels' VARLEN path (a block per sequence, see triton_attention's docstring)
    against the oracle, as the CPU test above; their tiles: tests/test_triton_visibility.py."""
    _check_triton(device, TRITON_LENGTHS[lengths], causal, window, dtype)


def test_varlen_triton_fp16(device):
    _check_triton(device, TRITON_LENGTHS["cross_lengths_differ"], True, (30, 0), torch.float16)


def _check_triton(device, lengths, causal, window, dtype):
    """The CPU test's comparison, run on the Triton backend on ``device`` (cpu: the interpreter)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, cu_q, cu_k, mq, mk = _packed(lengths, dtype, gen)

    def ours(q, k, v):
        out, lse = fused_attn.varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device),
                                               cu_k.to(device), mq, mk, causal=causal, window=window,
                                               return_lse=True, backend="triton")
        return out.cpu(), lse.cpu()
    got = _run(ours, q, k, v, 5)
    ref = _run(_oracle(torch.float64, cu_q, cu_k, causal, window), q, k, v, 5)
    base = _run(_oracle(None, cu_q, cu_k, causal, window), q, k, v, 5)
    truncated = stores_bf16_by_truncation("triton", dtype)
    for name in ("out", "lse", "dq", "dk", "dv"):
        if name == "lse":
            assert_close(got[name], ref[name], base[name], name, dtype=q.dtype)
        else:
            assert_close(got[name], ref[name], base[name], name, truncated_bf16=truncated)


def test_varlen_equals_padded_sdpa_per_sequence():
    """Each sequence of a varlen call equals scaled_dot_product_attention on it alone (lower-right
    causal), and the reference backend runs the same call."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, cu_q, cu_k, mq, mk = _packed(LENGTHS["cross_lengths_differ"], torch.float32, gen)
    out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend="cpu")
    ref = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend="reference")
    torch.testing.assert_close(out, ref)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.stop == qs.start:
            continue
        alone = fused_attn.scaled_dot_product_attention(
            q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1), enable_gqa=True,
            window=(-1, 0), backend="reference")  # (-1, 0): lower-right causal
        torch.testing.assert_close(out[qs], alone.transpose(0, 1), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("change,error,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 8])), ValueError, "cu_seqlens_q must run from 0 to 8 .* decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 9])), ValueError, "as many sequences, got 3 and 2"),
    (dict(cu_seqlens_q=torch.tensor([0., 8.])), TypeError, "cu_seqlens_q must be a 1-D int32 or int64 tensor"),
    (dict(max_seqlen_q=2), ValueError, "max_seqlen_q = 2 is less than the longest sequence, 3"),
    (dict(q=torch.randn(8, 3, 16)), ValueError, "multiple of the key/value heads, got 3 and 2"),
    (dict(k=torch.randn(9, 2, 8)), ValueError, "k must be \\(total_k, Hk, E\\)"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes of shape \(3\) does not broadcast to \(3, 4\)"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    (dict(window=(3, -2)), ValueError, "window must be a pair"),
])
def test_varlen_bad_arguments_say_what_was_passed(change, error, match):
    args = dict(q=torch.randn(8, 4, 16), k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16),
                cu_seqlens_q=torch.tensor([0, 3, 5, 8]), cu_seqlens_k=torch.tensor([0, 4, 4, 9]), max_seqlen_q=5,
                max_seqlen_k=5)
    args.update(change)
    with pytest.raises(error, match=match):
        fused_attn.varlen_attention(**args)


def test_varlen_backends_say_what_they_run():
    q, k, v = torch.randn(8, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    p = make_varlen_problem(q, k, v, torch.tensor([0, 3, 8]), torch.tensor([0, 4, 9]), 5, 5)
    from fused_attn import dispatch
    why = dispatch.refusals(p)
    assert why["cpu"] is None and why["cuda"].startswith("varlen_attention (packed variable-length sequences) is not supported")
