"""The kernel backends' torch.library ops are complete (issue 13 item 2): schema, fake
implementation and autograd formula registered on the ops themselves, checked by
``torch.library.opcheck`` for every op, every dtype its backend declares (``CAPABILITIES``),
with and without inputs that require grad; double backward raises naming the reference
backend. Runs the CPU kernels, the Triton kernels under the interpreter and the CUDA kernels
under their emulator (CPU tensors; the ops are called directly, not through the dispatcher).
"""
import pytest
import torch

import fused_attn
from fused_attn import dispatch
from fused_attn.spec import AttnSpec, CausalMode

from conftest import DEVICE

KERNEL_BACKENDS = ("cpu", "triton", "cuda")


pytestmark = pytest.mark.usefixtures("cuda_emulation")


def _cases():
    for name in KERNEL_BACKENDS:
        for dtype in dispatch.get(name).ops().CAPABILITIES.dtypes:
            yield pytest.param(name, dtype, id=f"{name}-{str(dtype).replace('torch.', '')}")


def _device(name):
    return "cpu" if name == "cpu" else DEVICE


@pytest.mark.parametrize("name,dtype", list(_cases()))
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_forward_and_backward(name, dtype, requires_grad):
    ops = dispatch.get(name).ops()
    spec = AttnSpec(scale=0.25, causal=CausalMode.LOWER_RIGHT)
    dev = _device(name)
    q = torch.randn(1, 2, 9, 16, dtype=dtype, device=dev).requires_grad_(requires_grad)
    k = torch.randn(1, 1, 13, 16, dtype=dtype, device=dev).requires_grad_(requires_grad)
    v = torch.randn(1, 1, 13, 8, dtype=dtype, device=dev).requires_grad_(requires_grad)
    torch.library.opcheck(ops.forward, (q, k, v, *spec.op_args()))
    with torch.no_grad():
        out, lse = ops.forward(q, k, v, *spec.op_args())
    for dlse in (torch.randn_like(lse), None):
        torch.library.opcheck(ops.backward, (torch.randn_like(out), dlse, q.detach(), k.detach(), v.detach(), out,
                                             lse, *spec.op_args()))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_forward_op_is_differentiable_by_itself(name):
    """The raw forward op (what a traced graph holds) gives the public call's gradients."""
    ops = dispatch.get(name).ops()
    dtype = ops.CAPABILITIES.dtypes[0]
    dev = _device(name)
    q, k, v = (torch.randn(1, 2, 11, 16, dtype=dtype, device=dev, requires_grad=True) for _ in range(3))
    spec = AttnSpec(scale=16 ** -0.5, causal=CausalMode.UPPER_LEFT)
    out, lse = ops.forward(q, k, v, *spec.op_args())
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    pub_out, pub_lse = fused_attn.attention_with_lse(q, k, v, is_causal=True, backend=name)
    want = torch.autograd.grad((pub_out, pub_lse), (q, k, v), (dout, dlse.to(pub_lse.dtype)))
    torch.testing.assert_close(out, pub_out, rtol=0, atol=0)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_double_backward_says_use_reference(name):
    ops = dispatch.get(name).ops()
    dtype = ops.CAPABILITIES.dtypes[0]
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=dtype, device=_device(name), requires_grad=True) for _ in range(3))
    out = fused_attn.scaled_dot_product_attention(q, k, v, backend=name)
    (gq,) = torch.autograd.grad(out.float().square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=f"backend '{name}' does not support double backward.*backend='reference'"):
        gq.float().sum().backward()


def test_double_backward_of_a_mask_gradient_says_use_reference():
    """Only the float mask requires grad: its gradient under create_graph refuses to be differentiated
    with the same message (not autograd's "does not require grad")."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    mask = torch.randn(9, 9, requires_grad=True)
    out = fused_attn.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    (gm,) = torch.autograd.grad(out.square().sum(), mask, create_graph=True)
    assert gm.requires_grad
    with pytest.raises(RuntimeError, match="backend 'cpu' does not support double backward.*backend='reference'"):
        gm.sum().backward()


def test_double_backward_on_the_reference():
    """What the error points to works: gradcheck of gradients on the reference backend."""
    q, k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference"),
        (q, k, v))


def test_eager_calls_skip_the_dispatcher_only_when_nothing_records(monkeypatch):
    """dispatch._traced: a plain inference call runs the op's implementation directly (no
    dispatcher layers), a training call its launchers under autograd.EagerAttention; a call that a
    dispatch mode (or torch.compile, tests/test_compile.py) records goes through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    direct = []
    real = dispatch._launch
    monkeypatch.setattr(dispatch, "_launch",
                        lambda ops, p: (direct.append(ops.__name__.rsplit(".", 1)[1]), real(ops, p))[1])

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    want = fused_attn.scaled_dot_product_attention(q, k, v, backend="reference")
    with torch.no_grad():
        got = fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert direct == ["cpu"]
    torch.testing.assert_close(got, want)
    direct.clear()
    qg = q.clone().requires_grad_()  # autograd records it: the formula in the extension (cpu), not the op
    out = fused_attn.scaled_dot_product_attention(qg, k, v, backend="cpu")
    assert "Attention" in out.grad_fn.name() and "EagerAttention" not in out.grad_fn.name() and direct == []
    out.sum().backward()
    assert qg.grad is not None
    with SeenOps() as mode, torch.no_grad():
        fused_attn.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert direct == [] and "fused_attn.cpu_fwd.default" in mode.ops


@pytest.mark.parametrize("case", ["plain_dlse", "float_mask_grad_dropout_gqa", "key_padding_window_alibi_softcap"])
def test_cpu_autograd_in_the_extension_matches_the_op(case):
    """Eager CPU calls that record gradients take the autograd formula compiled into the extension
    (ops.cpu._differentiable); traced calls the op's (fused_attn.autograd). The same kernels, so the same
    outputs and gradients bit for bit, for every tensor the formula passes on (mask, key bounds, ALiBi,
    dropout seed) and a gradient flowing into lse."""
    from fused_attn.ops import cpu
    from fused_attn.problem import make_problem

    torch.manual_seed(3)
    B, Hq, Hk, L, S, E = 2, 4, 2 if "gqa" in case else 4, 11, 37, 16
    q = torch.randn(B, Hq, L, E, requires_grad=True)
    k, v = (torch.randn(B, Hk, S, E, requires_grad=True) for _ in range(2))
    kw, leaves = {}, [q, k, v]
    if "float_mask" in case:
        kw["attn_mask"] = torch.randn(Hq, L, S, requires_grad=True)  # broadcast over the batch
        leaves.append(kw["attn_mask"])
        kw["dropout_p"] = 0.3
    if "key_padding" in case:
        keep = torch.arange(S)[None, :] < torch.tensor([[S], [S - 9]])
        kw.update(attn_mask=keep[:, None, None, :], window=(6, 3), alibi_slopes=torch.rand(Hq), softcap=2.5)
    p = make_problem(q, k, v, enable_gqa=True, **kw)
    assert ("key_padding" in case) == (p.key_bounds is not None)
    results = []
    for path in ("extension", "op"):
        if path == "extension":
            out, lse = cpu._differentiable(p.q, p.k, p.v, p.spec, **p.tensor_args())
            assert "EagerAttention" not in out.grad_fn.name()
        else:
            out, lse = cpu.forward(p.q, p.k, p.v, *p.spec.op_args(**p.tensor_args()))
        g = torch.Generator().manual_seed(5)
        dout = torch.randn(out.shape, generator=g)
        dlse = torch.randn(lse.shape, generator=g, dtype=lse.dtype) if case == "plain_dlse" else None
        grads = torch.autograd.grad((out, lse) if dlse is not None else (out,), leaves,
                                    (dout, dlse) if dlse is not None else (dout,))
        results.append((out, lse, *grads))
    for i, (got, want) in enumerate(zip(*results)):
        assert i == 1 or torch.isfinite(got).all()  # (lse: -inf where a window meets the padding)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
