"""The public API: torch SDPA semantics case by case, input errors, the dispatch point,
and the reference oracle itself against torch's math path in fp64."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fused_attn
from fused_attn import dispatch, reference
from fused_attn.problem import make_problem
from fused_attn.spec import CausalMode


def torch_math(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


# (q shape, k shape, v shape, kwargs): each a torch SDPA feature
SEMANTICS = {
    "2d": ((7, 16), (9, 16), (9, 16), {}),
    "3d": ((3, 7, 16), (3, 9, 16), (3, 9, 16), {}),
    "4d": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 16), {}),
    "5d": ((2, 2, 3, 7, 16), (2, 2, 3, 9, 16), (2, 2, 3, 9, 16), {}),
    "scale": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 16), {"scale": 0.77}),
    "causal_L<S": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 16), {"is_causal": True}),
    "causal_L>S": ((2, 3, 12, 16), (2, 3, 5, 16), (2, 3, 5, 16), {"is_causal": True}),
    "upper_left_bias": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 16), {"attn_mask": causal_upper_left(7, 9)}),
    "lower_right_bias": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 16), {"attn_mask": causal_lower_right(7, 9)}),
    "gqa": ((2, 6, 7, 16), (2, 2, 9, 16), (2, 2, 9, 16), {"enable_gqa": True}),
    "gqa_3d": ((6, 7, 16), (3, 9, 16), (3, 9, 16), {"enable_gqa": True}),
    "broadcast_batch": ((2, 3, 7, 16), (1, 3, 9, 16), (1, 3, 9, 16), {}),
    "value_dim": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 24), {}),
    "bool_mask": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 16), {"attn_mask": "bool"}),
    "float_mask": ((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 16), {"attn_mask": "float"}),
}


def _resolve(kwargs, L, S, dtype):
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(3, L, S) > 0.3  # broadcasts over batch
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(L, S, dtype=dtype)
    return kwargs


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("case", list(SEMANTICS))
def test_matches_torch_sdpa(case, backend):
    qs, ks, vs, kwargs = SEMANTICS[case]
    q, k, v = (rand(*s).requires_grad_() for s in (qs, ks, vs))
    kwargs = _resolve(kwargs, qs[-2], ks[-2], q.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # automatic choice says it fell back to the reference
        got = fused_attn.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    want = torch_math(q, k, v, **kwargs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))


def test_reference_against_torch_math_fp64():
    """The oracle itself: all three causal modes and GQA, output and gradients, in fp64."""
    for mode, L, S in [(CausalMode.NONE, 11, 13), (CausalMode.UPPER_LEFT, 13, 11), (CausalMode.LOWER_RIGHT, 11, 13)]:
        q, k, v = rand(2, 4, L, 8).requires_grad_(), rand(2, 2, S, 8).requires_grad_(), rand(2, 2, S, 8).requires_grad_()
        out, lse = reference.attention(q, k, v, causal=mode, compute_dtype=torch.float64)
        mask = reference.causal_mask(L, S, mode)
        want = torch_math(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out, want)
        s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(lse, torch.logsumexp(s, -1))
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))


def test_lse_combines_partial_attentions():
    """Attention over keys [0, 40) and [40, 97) combined through the lse equals attention over all."""
    q, k, v = rand(1, 2, 30, 16, dtype=torch.float32), rand(1, 2, 97, 16, dtype=torch.float32), rand(1, 2, 97, 16, dtype=torch.float32)
    o1, l1 = fused_attn.attention_with_lse(q, k[:, :, :40], v[:, :, :40], backend="triton")
    o2, l2 = fused_attn.attention_with_lse(q, k[:, :, 40:], v[:, :, 40:], backend="triton")
    o, l = fused_attn.attention_with_lse(q, k, v, backend="triton")
    lse = torch.logaddexp(l1, l2)
    combined = torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2
    torch.testing.assert_close(lse, l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(combined, o, atol=1e-5, rtol=1e-5)


BAD_INPUTS = [
    ("dtype", lambda: (rand(2, 3, 4, 8), rand(2, 3, 4, 8, dtype=torch.float32), rand(2, 3, 4, 8)), {},
     "one dtype, got torch.float64, torch.float32, torch.float64"),
    ("int dtype", lambda: tuple(torch.ones(2, 3, 4, 8, dtype=torch.int32) for _ in range(3)), {},
     "dtype torch.int32 is not supported"),
    ("heads", lambda: (rand(2, 3, 4, 8), rand(2, 2, 4, 8), rand(2, 2, 4, 8)), {}, "do not broadcast"),
    ("1-D", lambda: (rand(4, 8), rand(8), rand(4, 8)), {}, "at least 2-D"),
    ("head dim", lambda: (rand(2, 3, 4, 8), rand(2, 3, 4, 16), rand(2, 3, 4, 8)), {}, "same head dim E"),
    ("kv length", lambda: (rand(2, 3, 4, 8), rand(2, 3, 5, 8), rand(2, 3, 6, 8)), {}, "same length S"),
    ("gqa off", lambda: (rand(2, 6, 4, 8), rand(2, 3, 4, 8), rand(2, 3, 4, 8)), {}, "needs enable_gqa=True"),
    ("gqa ratio", lambda: (rand(2, 6, 4, 8), rand(2, 4, 4, 8), rand(2, 4, 4, 8)), {"enable_gqa": True},
     "divisible by key heads, got 6 and 4"),
    ("gqa value ratio", lambda: (rand(2, 6, 4, 8), rand(2, 3, 4, 8), rand(2, 4, 4, 8)), {"enable_gqa": True},
     "divisible by value heads, got 6 and 4"),
    ("gqa fewer query heads", lambda: (rand(2, 1, 4, 8), rand(2, 3, 4, 8), rand(2, 3, 4, 8)), {"enable_gqa": True},
     "divisible by key heads, got 1 and 3"),
    ("batch", lambda: (rand(2, 3, 4, 8), rand(3, 3, 4, 8), rand(3, 3, 4, 8)), {}, "must broadcast"),
    ("causal bias and is_causal", lambda: (rand(2, 3, 4, 8),) * 3, {"attn_mask": causal_upper_left(4, 4),
                                                                  "is_causal": True}, "pass one of them"),
    ("mask shape", lambda: (rand(2, 3, 4, 8),) * 3, {"attn_mask": torch.ones(5, 4, dtype=torch.bool)},
     "does not broadcast to (2, 3, 4, 4)"),
    ("mask dtype", lambda: (rand(2, 3, 4, 8),) * 3, {"attn_mask": torch.ones(4, 4, dtype=torch.float16)},
     "bool, float32 or the query's dtype torch.float64, got torch.float16"),
    ("bias lengths", lambda: (rand(2, 3, 4, 8),) * 3, {"attn_mask": causal_lower_right(5, 4)},
     "CausalBias for (L, S) = (5, 4)"),
    ("dropout", lambda: (rand(2, 3, 4, 8),) * 3, {"dropout_p": 1.5}, "dropout_p must be in [0, 1], got 1.5"),
    ("not a tensor", lambda: ([1.0], rand(2, 3, 4, 8), rand(2, 3, 4, 8)), {}, "query must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,make,kwargs,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_with_message(name, make, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        fused_attn.scaled_dot_product_attention(*make(), **kwargs)


def test_unknown_backend():
    q = rand(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown fused_attn backend 'flash'"):
        fused_attn.scaled_dot_product_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="unknown fused_attn backend"):
        with fused_attn.use_backend("nope"):
            pass


@pytest.mark.parametrize("kwargs,reason", [
    ({"attn_mask": "float"}, "float attn_mask tensor is not supported"),
    ({"attn_mask": "bool"}, "boolean attn_mask tensor is not supported"),
    ({"dropout_p": 0.1}, "dropout_p > 0 is not supported"),
])
def test_explicit_kernel_backend_refuses_with_reason(kwargs, reason):
    q = rand(1, 3, 4, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=f"backend 'cuda' cannot run this call: .*{reason}"):
        fused_attn.scaled_dot_product_attention(q, q, q, backend="cuda", **_resolve(kwargs, 4, 4, q.dtype))


def test_explicit_backend_unsupported_dtype_and_head_dim():
    q = rand(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported"):
        fused_attn.scaled_dot_product_attention(q, q, q, backend="triton")
    q = rand(1, 1, 4, 300, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dims up to 256 are supported, got E = 300"):
        fused_attn.scaled_dot_product_attention(q, q, q, backend="triton")


def _spy(monkeypatch):
    ran = []
    for (_, name), b in dispatch.BACKENDS.items():
        monkeypatch.setattr(b, "run", (lambda f, n: lambda p: (ran.append(n), f(p))[1])(b.run, name))
    return ran


def test_requested_backend_precedence(monkeypatch):
    ran = _spy(monkeypatch)
    q = rand(1, 2, 5, 8, dtype=torch.float16)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    fused_attn.scaled_dot_product_attention(q, q, q)
    with fused_attn.use_backend("triton"):
        fused_attn.scaled_dot_product_attention(q, q, q)
        fused_attn.scaled_dot_product_attention(q, q, q, backend="reference")
        with fused_attn.use_backend(None):
            fused_attn.scaled_dot_product_attention(q, q, q)  # back to the environment's choice
    assert ran == ["reference", "triton", "reference", "reference"]


def test_automatic_choice_falls_back_and_says_so_once(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_said", set())
    ran = _spy(monkeypatch)
    q = rand(1, 2, 5, 300, dtype=torch.float32)  # a head dim no kernel takes
    with pytest.warns(UserWarning, match="cpu: head dims up to 256 are supported, got E = 300"):
        fused_attn.scaled_dot_product_attention(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_attn.scaled_dot_product_attention(q, q, q)
    assert ran[-2:] == ["reference", "reference"]
    reasons = fused_attn.explain_dispatch(q, q, q)
    assert list(reasons) == list(dispatch.ORDER) and reasons["reference"] is None
    q = q[..., :8]
    assert "ask for backend='triton' by name" in fused_attn.explain_dispatch(q, q, q)["triton"]


def test_automatic_choice_passes_over_test_vehicles_for_cpu_tensors(monkeypatch):
    """Triton's and CUDA's CPU paths refuse CPU tensors under automatic choice (the rule the shortcut
    rests on); automatic choice does not ask them then (per-call cost), only for a fallback message."""
    q = rand(1, 2, 5, 8, dtype=torch.float32)
    p = make_problem(q, q, q)
    for name in ("triton", "cuda"):
        assert dispatch.get(name).cpu_by_name_only and dispatch.get(name).refusal(p, explicit=False)
    asked = []
    for name in ("triton", "cuda"):
        b = dispatch.get(name)
        monkeypatch.setattr(b, "refusal", (lambda f, n: lambda *a, **kw: (asked.append(n), f(*a, **kw))[1])(
            b.refusal, name))
    assert dispatch.choose(p).name == "cpu" and asked == []
    monkeypatch.setattr(dispatch, "_said", set())
    wide = rand(1, 2, 5, 300, dtype=torch.float32)
    with pytest.warns(UserWarning, match="triton: .*; cuda: .*; cpu: head dims up to 256"):
        assert dispatch.choose(make_problem(wide, wide, wide)).name == "reference"
    assert asked == ["triton", "cuda"]


def test_fully_masked_rows_are_zero_with_zero_grad():
    q, k, v = (rand(1, 2, 4, 8).requires_grad_() for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    assert torch.all(out[:, :, 2] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :, 2] == 0) and torch.isfinite(k.grad).all()


def test_fake_kernels_trace_shapes():
    """The ops' fake implementations give the real ops' shapes (what torch.compile traces with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fused_attn.ops.cpu  # noqa: F401  (registers the ops)
    import fused_attn.ops.triton_attention  # noqa: F401
    q, k, v = rand(2, 6, 7, 16, dtype=torch.float16), rand(2, 2, 9, 16, dtype=torch.float16), rand(2, 2, 9, 24, dtype=torch.float16)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out, lse = torch.ops.fused_attn.triton_fwd(fq, fk, fv, 1, 0.25)
        dq, dk, dv, dmask = torch.ops.fused_attn.triton_bwd(out, None, fq, fk, fv, out, lse, 1, 0.25)
        fmask = mode.from_tensor(rand(2, 6, 7, 9, dtype=torch.float16))
        cpu_grads = torch.ops.fused_attn.cpu_bwd(out, None, fq, fk, fv, out, lse, 1, 0.25, mask=fmask,
                                                 mask_grad=True)
    assert out.shape == (2, 6, 7, 24) and lse.shape == (2, 6, 7) and lse.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape, dmask.shape) == (q.shape, k.shape, v.shape, (0,))
    assert cpu_grads[3].shape == fmask.shape and cpu_grads[3].dtype == fmask.dtype


def test_automatic_order_by_device(monkeypatch):
    """Hopper and CPU try Triton first; Ampere/Ada try the hand-written CUDA kernels first."""
    assert dispatch.order(torch.device("cpu")) == dispatch.ORDER
    for major, expected in ((8, dispatch.ORDER_BEFORE_HOPPER), (9, dispatch.ORDER)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert dispatch.order(torch.device("cuda")) == expected
    assert set(dispatch.ORDER) == set(dispatch.ORDER_BEFORE_HOPPER) == set(dispatch.NAMES)


@pytest.mark.parametrize("shapes,kwargs", [
    (((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 24)), {"is_causal": True}),
    (((2, 6, 7, 16), (2, 2, 9, 16), (2, 2, 9, 16)), {"enable_gqa": True}),
    (((2, 6, 7, 16), (2, 1, 9, 16), (2, 1, 9, 16)), {}),
    (((1, 2, 0, 16), (1, 2, 9, 16), (1, 2, 9, 16)), {}),
])
@pytest.mark.parametrize("grad", [False, True])
def test_common_call_fast_path_builds_the_general_problem(shapes, kwargs, grad):
    """make_problem's fast path for plain 4-D calls gives the Problem the general path builds."""
    from fused_attn.problem import common_call, make_problem

    q, k, v = (rand(*s).requires_grad_(grad) for s in shapes)
    fast = common_call(q, k, v, kwargs.get("is_causal", False), None, kwargs.get("enable_gqa", False))
    general = make_problem(q, k, v, scale=shapes[0][-1] ** -0.5, **kwargs)  # a scale: the general path
    assert fast is not None
    for field in ("out_shape", "mask"):
        assert getattr(fast, field) == getattr(general, field), field
    assert (fast.spec.causal, fast.spec.dropout_p) == (general.spec.causal, general.spec.dropout_p)
    assert fast.spec.scale == pytest.approx(general.spec.scale, rel=1e-15)
    for a, b in ((fast.q, general.q), (fast.k, general.k), (fast.v, general.v)):
        assert a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
    assert common_call(q, k[:1] if k.shape[0] > 1 else k[:, :, :1], v, False, None, False) is None


def test_use_backend_is_per_thread(monkeypatch):
    import threading

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = dispatch.requested_backend()
        with fused_attn.use_backend("cpu"):
            seen["other inner"] = dispatch.requested_backend()
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with fused_attn.use_backend("reference"):
        inside.set()
        done.wait()
        seen["main"] = dispatch.requested_backend()
    t.join()
    assert seen == {"other": None, "other inner": "cpu", "main": "reference"}
    assert dispatch.requested_backend() is None


def test_common_call_lane(monkeypatch):
    """dispatch.run_common: a common call (no mask, dropout, window, ALiBi, softcap, scale or backend) whose
    configuration automatic choice has resolved runs without choose (per-call cost), with the same outputs and
    gradients bit for bit as the general path; a requested backend (argument, context, environment), something
    tracing the call, or LANES = False sends it through choose."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(dispatch, "_lanes", {})
    monkeypatch.setattr(dispatch, "_choices", {})
    asked = []
    real_choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda p, backend=None, **kw: (asked.append(backend), real_choose(
        p, backend, **kw))[1])
    for dtype, causal, Hk in ((torch.float32, False, 4), (torch.bfloat16, True, 2)):
        q = rand(2, 4, 7, 16, dtype=dtype).requires_grad_()
        k, v = (rand(2, Hk, 9, 16, dtype=dtype).requires_grad_() for _ in range(2))
        outs = []
        for n_asked in (1, 0, 0):  # the first call fills the lane, the next take it
            asked.clear()
            out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            assert len(asked) == n_asked
            outs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
        with torch.no_grad():
            assert fused_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).grad_fn is None
        asked.clear()
        general = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend="cpu")
        assert asked == ["cpu"]
        want = (general, *torch.autograd.grad(general.float().square().sum(), (q, k, v)))
        for got in outs:
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    q = rand(1, 2, 5, 8)
    fused_attn.scaled_dot_product_attention(q, q, q)
    asked.clear()
    fused_attn.scaled_dot_product_attention(q, q, q)
    assert asked == []
    with fused_attn.use_backend("cpu"):
        fused_attn.scaled_dot_product_attention(q, q, q)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    fused_attn.scaled_dot_product_attention(q, q, q)
    monkeypatch.delenv(dispatch.ENV_VAR)

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Seen():
        fused_attn.scaled_dot_product_attention(q, q, q)
    monkeypatch.setattr(dispatch, "LANES", False)
    fused_attn.scaled_dot_product_attention(q, q, q)
    assert asked == [None] * 4
    monkeypatch.setattr(dispatch, "LANES", True)
    empty = rand(0, 2, 5, 8)  # no query row: the general path's empty result
    assert fused_attn.scaled_dot_product_attention(empty, empty, empty).shape == (0, 2, 5, 8)
