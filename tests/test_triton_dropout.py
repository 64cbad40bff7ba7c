"""Dropout inside the Triton kernels (interpreter), forward and backward.

The kernels regenerate fused_attn.dropout's Philox stream tile by tile (nothing of size L x S is
stored). Checked two ways:
- the keep decision exactly: with v = identity (Ev = S) the output's row i, column j is
  P_ij * keep_ij * keep_scale, so with P > 0 everywhere it is nonzero exactly where
  dropout.keep_mask keeps; for p close to 0 and close to 1 (the threshold compared unsigned), with
  causal, a window and GQA, and for varlen sequences whose keys start at packed offsets that are not
  multiples of 4 (the kernels' misaligned Philox path);
- out and the gradients against the fp64 reference given the same seed (make_problem draws it from
  torch's generator, so torch.manual_seed before each call gives both the same stream), under the
  tolerance rule: fp32, fp16, bf16, with causal, windows, key bounds, GQA, ALiBi and softcap, varlen.
"""
import pytest
import torch

import fused_attn
from fused_attn import dropout, reference
from fused_attn.ops import triton_attention as T
from fused_attn.spec import AttnSpec, CausalMode, visible_keys
from fused_attn.testing import assert_close, stores_bf16_by_truncation

from attn_cases import make_inputs

pytestmark = pytest.mark.skipif(not T.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")

NONE, UL, LR = CausalMode.NONE, CausalMode.UPPER_LEFT, CausalMode.LOWER_RIGHT
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


def _seeded_stream(seed):
    """The dropout seed a call made right after torch.manual_seed(seed) draws (make_problem's)."""
    torch.manual_seed(seed)
    return dropout.draw_seed()


# ---- the keep decision, exactly ----------------------------------------------------------------

@pytest.mark.parametrize("p,mode,window,L,S", [(0.5, NONE, (-1, -1), 113, 203), (0.1, UL, (-1, -1), 40, 97),
                                               (0.9, NONE, (30, 5), 97, 130), (0.999, NONE, (-1, -1), 17, 64)],
                         ids=["p0.5-L113-S203", "p0.1-causal", "p0.9-window", "p0.999"])
def test_keep_mask_exact(device, p, mode, window, L, S):
    """(out != 0) is dropout.keep_mask where a key is visible, with v = identity (GQA 2:1, so both
    query heads of a kv head read its one identity); kept values are P * keep_scale."""
    B, Hq, Hk, E = 2, 2, 1, 16
    q, k, _ = make_inputs(B, Hq, Hk, L, S, E, E, FP32, device)
    q, k = q * 0.3, k * 0.3  # P > 0 everywhere a key is visible (no underflow)
    v = torch.eye(S, device=device).expand(B, Hk, S, S)
    seed = 11
    torch.manual_seed(seed)
    out = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=mode is UL, window=window,
                                                  enable_gqa=True, backend="triton")
    stream = _seeded_stream(seed)
    spec = AttnSpec(scale=E ** -0.5, causal=mode, window_left=window[0], window_right=window[1])
    seen = visible_keys(L, S, spec, device=device)
    keep = dropout.keep_mask(stream, p, B, Hq, L, S, device=device)
    want = keep if seen is None else keep & seen
    assert torch.equal(out != 0, want), f"{int((out != 0).ne(want).sum())} elements differ from keep_mask"
    probs, _ = reference.attention(q, k, v, None, 0.0, mode, window=window)
    torch.testing.assert_close(out, probs * want * dropout.keep_scale(p), rtol=1e-5, atol=0)


def test_keep_mask_exact_varlen(device):
    """Varlen: element (h, i, j) of the packed rows and keys; the sequences' keys start at packed offsets
    23, 28, 69 (not multiples of 4: each key picks its Philox output across two calls)."""
    lengths = [(17, 23), (0, 5), (30, 41), (40, 33), (9, 0)]
    Hq, E, p, seed = 2, 16, 0.5, 5
    cu_q = torch.tensor([0] + torch.tensor([a for a, _ in lengths]).cumsum(0).tolist(), device=device)
    cu_k = torch.tensor([0] + torch.tensor([b for _, b in lengths]).cumsum(0).tolist(), device=device)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = 0.3 * torch.randn(total_q, Hq, E, device=device)
    k = 0.3 * torch.randn(total_k, 1, E, device=device)
    v = torch.eye(total_k, device=device)[:, None, :]  # (total_k, 1, total_k): column j is packed key j
    torch.manual_seed(seed)
    out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 40, 41, dropout_p=p, backend="triton")
    stream = _seeded_stream(seed)
    keep = dropout.keep_mask(stream, p, 1, Hq, total_q, total_k, device=device)[0].transpose(0, 1)  # (rows, H, keys)
    block = torch.zeros(total_q, total_k, dtype=torch.bool, device=device)
    for s in range(len(lengths)):
        block[cu_q[s]:cu_q[s + 1], cu_k[s]:cu_k[s + 1]] = True
    want = keep & block[:, None, :]
    assert torch.equal(out != 0, want), f"{int((out != 0).ne(want).sum())} elements differ from keep_mask"


# ---- out and gradients against the reference with the same seed ---------------------------------

def _grads(fn, q, k, v, gen_seed):
    """out and the gradients of sum(out * dout), dout drawn from ``gen_seed`` in the inputs' dtype."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(gen_seed)).to(q.dtype).double()
    grads = torch.autograd.grad((out.double() * dout).sum(), leaves, allow_unused=True, materialize_grads=True)
    return dict(zip(("out", "dq", "dk", "dv"), (out.detach(), *grads)))


def check_dropout(q, k, v, p, mode=NONE, window=(-1, -1), bounds=None, alibi=None, softcap=0.0, seed=3):
    """Triton's out, dq, dk, dv with dropout p against reference.attention in fp64 given the same seed
    (plain PyTorch: the reference in the inputs' dtype), under the tolerance rule. ``bounds``: per-batch
    key bounds, as a key-padding mask; ``alibi``: (B, Hq) slopes."""
    B, S = q.shape[0], k.shape[-2]
    mask = None
    if bounds is not None:
        j = torch.arange(S, device=q.device)
        kb = torch.tensor(bounds, device=q.device)
        mask = ((j >= kb[:, :1]) & (j < kb[:, 1:]))[:, None, None, :]
    stream = _seeded_stream(seed)

    # lower-right causal: window (-1, 0), which make_problem turns into it (an attn_mask is taken by the bounds)
    assert mode is not LR or window == (-1, -1)
    public_window = (-1, 0) if mode is LR else window

    def ours(q, k, v):
        torch.manual_seed(seed)
        return fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mode is UL,
                                                       window=public_window, enable_gqa=q.shape[1] != k.shape[1],
                                                       alibi_slopes=alibi, softcap=softcap, backend="triton")

    def oracle(compute_dtype):
        def fn(q, k, v):
            return reference.attention(q, k, v, mask, p, mode, window=window, alibi_slopes=alibi, softcap=softcap,
                                       dropout_seed=stream, compute_dtype=compute_dtype)[0]
        return fn
    got = _grads(ours, q, k, v, seed)
    ref = _grads(oracle(torch.float64), q, k, v, seed)
    base = _grads(oracle(None), q, k, v, seed)
    truncated = stores_bf16_by_truncation("triton", q.dtype)
    for name in got:
        assert_close(got[name], ref[name], base[name], name, truncated_bf16=truncated)


@pytest.mark.parametrize("dtype,p,mode,L,S", [(FP32, 0.1, NONE, 113, 97), (FP32, 0.9, LR, 113, 64),
                                              (FP16, 0.5, UL, 97, 113), (BF16, 0.5, NONE, 17, 64)],
                         ids=["fp32-p0.1-L113-S97", "fp32-p0.9-lower_right-L113-S64", "fp16-p0.5-causal",
                              "bf16-p0.5-L17"])
def test_dropout(device, dtype, p, mode, L, S):
    check_dropout(*make_inputs(1, 2, 1, L, S, 16, 16, dtype, device), p, mode)


def test_dropout_everything_dropped(device):
    """p = 1: out = 0 and dv = 0; dq, dk as the reference (zero here, no lse gradient)."""
    check_dropout(*make_inputs(1, 2, 2, 40, 50, 16, 16, FP32, device), 1.0, UL)


def test_dropout_gqa_window_bounds_alibi_softcap(device):
    """Every feature at once: GQA 4:2 (dK/dV sum a group's heads, each with its own stream), a window,
    key bounds, ALiBi and soft-capping."""
    q, k, v = make_inputs(2, 4, 2, 64, 100, 16, 16, FP16, device)
    alibi = torch.rand(2, 4, device=device)
    check_dropout(q, k, v, 0.3, window=(40, 8), bounds=((5, 90), (33, 100)), alibi=alibi, softcap=3.0)


def test_dropout_varlen(device):
    """Varlen sequences (keys at packed offsets not multiples of 4, an empty sequence) with causal,
    ALiBi per sequence, out, lse and every gradient against reference.varlen_attention with the seed."""
    from test_varlen import _oracle, _packed, _run

    lengths = [(17, 23), (0, 5), (64, 61), (33, 40), (9, 0)]
    q, k, v, cu_q, cu_k, mq, mk = _packed(lengths, FP32, torch.Generator().manual_seed(2))
    alibi = torch.rand(len(lengths), q.shape[1])
    p, seed = 0.4, 9
    stream = _seeded_stream(seed)

    def ours(q, k, v):
        torch.manual_seed(seed)
        return fused_attn.varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                           mq, mk, dropout_p=p, causal=True, alibi_slopes=alibi.to(device),
                                           return_lse=True, backend="triton")

    def oracle(compute_dtype):
        return _oracle(compute_dtype, cu_q, cu_k, True, dropout_p=p, alibi_slopes=alibi, dropout_seed=stream)
    got = _run(ours, q, k, v, 5)
    ref = _run(oracle(torch.float64), q, k, v, 5)
    base = _run(oracle(None), q, k, v, 5)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close(got[name].cpu(), ref[name], base[name], name, dtype=FP32)


def test_prune_hook_reads_dropout_and_mask_grad():
    """The autotuner's prune (never run by the interpreter) gets DROPOUT and MASK_GRAD as keyword constexprs and
    keeps the smaller tiles the compile table measured for dropout's Philox tiles (DROPOUT_REGISTER_SHARE):
    at head dim 256 fp16 on sm_80, dK/dV (16, 16) blocks, not the (16, 32) ones that spill with dropout."""
    def blocks(kind, dropout_on):
        kwargs = dict(HEAD_DIM=256, HEAD_DIM_V=256, DTYPE="fp16", ARCH=80, ALIGNED=True, VARLEN=False,
                      DROPOUT=dropout_on)
        kept = T.prune_hook(kind)(T.CONFIGS[kind][2], {T.TUNED_LENGTH[kind]: 1024}, **kwargs)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept]
    assert blocks("dkdv", True) == [(16, 16)] and (16, 32) in blocks("dkdv", False)
    assert blocks("fwd", True) == [(64, 32)] and (64, 64) in blocks("fwd", False)
    assert T.fixed_config("dkdv", 256, 256, "fp16", 80, 1024, dropout=True).kwargs["BLOCK_N"] == 16
    # the float mask's gradient (MASK_GRAD_REGISTER_SHARE): the same (16, 32) tiles spilled at bf16 head dim 256
    grad_blocks = T.prune_hook("dkdv")(T.CONFIGS["dkdv"][2], {"S_BUCKET": 1024}, HEAD_DIM=256, HEAD_DIM_V=256,
                                       DTYPE="bf16", ARCH=80, ALIGNED=True, MASK_GRAD=True)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in grad_blocks] == [(16, 16)]
    assert T.fixed_config("dkdv", 256, 256, "bf16", 80, 1024, mask_grad=True).kwargs["BLOCK_N"] == 16
