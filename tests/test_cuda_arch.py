"""Which GPUs the CUDA backend accepts, decided on the CPU with faked devices.

What the extension holds (``fused_attn._C_cuda.built_archs``, recorded by setup.py) is faked
with a stand-in module, the GPU's compute capability by monkeypatching
``torch.cuda.get_device_capability``, and CUDA tensors are FakeTensors (no memory, no GPU).
The decision is read through the real dispatcher: ``fused_attn.explain_dispatch`` and
``dispatch.choose``. The expectations below are written out by hand from CUDA's
compatibility rules, not computed by the code under test. setup.py's parsing of
FUSED_ATTN_CUDA_ARCHS is tested here too, and the grid-size refusal (batch on grid z,
heads on grid y, 65535 each).
"""
import runpy
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_attn
from fused_attn import dispatch
from fused_attn.ops import cuda
from fused_attn.problem import make_problem

from conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]
CAPS = ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5))

# built_archs as the binding reports it -> the capabilities (in CAPS order) it runs on.
RUNS_ON = {
    # setup.py's default: SASS for Ampere/Ada/Hopper, compute_80 PTX that newer GPUs JIT
    "sm_80+sm_86+sm_89+sm_90a+compute_80": (True, True, True, True, True, True, False),
    # the previous default (no PTX): Blackwell had no kernel image
    "sm_80+sm_86+sm_89+sm_90a": (True, True, True, True, False, False, False),
    "sm_90a": (False, False, False, True, False, False, False),           # native on an H100
    "sm_80": (True, True, True, False, False, False, False),              # sm_8x SASS runs on 8.y, y >= x
    "sm_86": (False, True, True, False, False, False, False),
    "sm_100": (False, False, False, False, True, False, False),           # native on a B200
    "sm_120+compute_120": (False, False, False, False, False, True, False),
    "compute_86": (False, True, True, True, True, True, False),           # PTX JITs for 8.6 and newer
    "compute_90a": (False, False, False, True, False, False, False),      # arch-specific PTX: 9.0 only
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(capability, built) makes the dispatcher see such a GPU and extension."""
    def make(capability, built):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(cuda, "_C_cuda", types.SimpleNamespace(built_archs=built))
    return make


def _fake_cuda(*shapes, dtype=torch.bfloat16):
    mode = FakeTensorMode()
    with mode:
        return mode, [torch.empty(s, dtype=dtype, device="cuda") for s in shapes]


def _cuda_refusal(shape=(2, 4, 128, 64), **kw):
    mode, (q, k, v) = _fake_cuda(shape, shape, shape)
    with mode:
        return fused_attn.explain_dispatch(q, k, v, **kw)["cuda"]


@pytest.mark.parametrize("built", list(RUNS_ON))
@pytest.mark.parametrize("cap", CAPS, ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_explain_dispatch_by_arch(fake_gpu, cap, built):
    fake_gpu(cap, built)
    why = _cuda_refusal()
    if RUNS_ON[built][CAPS.index(cap)]:
        assert why is None
    elif cap < (8, 0):
        assert "8.0 or newer" in why and "7.5 (sm_75)" in why
    else:
        # the refusal names this GPU's arch and everything that was built
        assert f"sm_{cap[0]}{cap[1]}" in why and f"{cap[0]}.{cap[1]}" in why
        assert all(t in why for t in built.split("+")) and "FUSED_ATTN_CUDA_ARCHS" in why


def test_automatic_choice_falls_back_and_explicit_choice_says_why(fake_gpu):
    mode, (q, k, v) = _fake_cuda(*[(1, 2, 64, 64)] * 3)
    with mode:
        p = make_problem(q, k, v)
        fake_gpu((8, 0), "sm_80+sm_86+sm_89+sm_90a+compute_80")
        assert dispatch.choose(p).name == "cuda"  # Ampere: cuda is tried first
        fake_gpu((12, 0), "sm_80+sm_86+sm_89+sm_90a")
        with warnings.catch_warnings():  # on the CPU the fallback is the reference, which says why once
            warnings.simplefilter("ignore")
            assert dispatch.choose(p).name != "cuda"
        with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call: .*sm_120"):
            dispatch.choose(p, "cuda")


def test_unrecorded_build_is_left_to_the_launch(fake_gpu):
    """An extension built without setup.py's record: the launch itself reports a missing image."""
    fake_gpu((10, 0), "")
    assert cuda.built_archs() is None
    assert _cuda_refusal() is None


def test_missing_extension_is_the_reason(monkeypatch):
    monkeypatch.setattr(cuda, "_C_cuda", None)
    monkeypatch.setattr(cuda, "_IMPORT_ERROR", "the CUDA extension fused_attn._C_cuda is not available (test)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "is not available (test)" in _cuda_refusal()


# ---- grid limits: batch on grid z, query heads on grid y ----------------------------------

@pytest.mark.parametrize("shape,what", [((65536, 1, 16, 64), "batch 65536"), ((1, 65536, 16, 64), "65536 heads"),
                                        ((70000, 16, 64), "70000 heads")])  # 3-D (N, L, E): N is the heads
def test_grid_limits_are_refused(fake_gpu, shape, what):
    fake_gpu((9, 0), "sm_90a")
    why = _cuda_refusal(shape)
    assert "<= 65535 (CUDA grid z and y)" in why and what in why


def test_grid_limits_at_the_edge_are_accepted(fake_gpu):
    fake_gpu((9, 0), "sm_90a")
    assert _cuda_refusal((65535, 2, 16, 64)) is None
    assert _cuda_refusal((2, 65535, 16, 64)) is None


@pytest.mark.skipif(DEVICE != "cpu", reason="calls the emulator's binding")
def test_binding_refuses_grid_overflow(monkeypatch):
    """The binding's own check (shared by the GPU build and the emulator) stops a direct call."""
    from fused_attn.ops import _emu

    q = torch.randn(65536, 1, 1, 8).half()
    out, lse = torch.empty_like(q), torch.empty(65536, 1, 1)
    with pytest.raises(RuntimeError, match="batch and heads must be <= 65535 .* got 65536 and 1"):
        _emu.load().flash_fwd(q, q, q, out, lse, 0, 1.0)


# ---- setup.py: FUSED_ATTN_CUDA_ARCHS ------------------------------------------------------

@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions (its setup() call runs only as __main__)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="fused_attn_setup")


def test_default_archs_embed_ptx(setup_py):
    flags, built = setup_py["cuda_arch_flags"](setup_py["DEFAULT_CUDA_ARCHS"])
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=compute_80",
                     "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_89,code=sm_89",
                     "-gencode=arch=compute_90a,code=sm_90a"]
    # what the binding then reports is the first row of RUNS_ON (order aside)
    assert sorted(built) == sorted("sm_80+sm_86+sm_89+sm_90a+compute_80".split("+"))


@pytest.mark.parametrize("spec,built", [
    ("8.6; 9.0a, 100+PTX", ["sm_86", "sm_90a", "sm_100", "compute_100"]),
    ("120", ["sm_120"]),
    ("80+ptx;80;8.0", ["sm_80", "compute_80"]),  # repeats dropped
    ("native", ["sm_90a"]),
    ("native;80+PTX", ["sm_90a", "sm_80", "compute_80"]),
])
def test_arch_specs(setup_py, spec, built):
    got_flags, got_built = setup_py["cuda_arch_flags"](spec, native=lambda: ["90a"])
    assert got_built == built and len(got_flags) == len(built)


@pytest.mark.parametrize("spec,match", [("75", "sm_80 or newer.*'75'"), ("7.0+PTX", "sm_80 or newer"),
                                        ("sm80", "cannot read 'sm80'"), ("", "is empty")])
def test_bad_arch_specs_say_what_is_allowed(setup_py, spec, match):
    with pytest.raises(ValueError, match=match):
        setup_py["cuda_arch_flags"](spec, native=lambda: ["90a"])


def test_native_reads_the_visible_gpus(setup_py, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    caps = {0: (9, 0), 1: (12, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    assert setup_py["native_archs"]() == ["90a", "120"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="native: torch sees no CUDA device"):
        setup_py["native_archs"]()


def test_cuda_extension_gets_the_gencode_flags_and_the_record(setup_py, monkeypatch):
    """setup.py's CUDA extension as a CUDA torch would build it (CUDA_HOME and torch.version.cuda
    faked): every -gencode flag, and the -D record the binding reports as built_archs."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("FUSED_ATTN_CUDA_ARCHS", "80+PTX;90a")
    monkeypatch.setenv("FUSED_ATTN_SKIP_CPU_BUILD", "1")
    monkeypatch.chdir(ROOT)
    (ext,) = setup_py["extensions"]()
    nvcc = ext.extra_compile_args["nvcc"]
    assert ext.name == "fused_attn._C_cuda" and "csrc/cuda/binding/flash_api.cu" in ext.sources
    assert [f for f in nvcc if f.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=compute_80",
        "-gencode=arch=compute_90a,code=sm_90a"]
    assert "-DFUSED_ATTN_BUILT_ARCHS=sm_80+compute_80+sm_90a" in nvcc
    monkeypatch.setenv("FUSED_ATTN_SKIP_CUDA_BUILD", "1")
    assert setup_py["extensions"]() == []
