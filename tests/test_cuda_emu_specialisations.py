"""The causal x even-tile specialisations of the CUDA kernels (template flags kIsCausal and
kIsEvenMN of csrc/cuda/flash_{fwd,bwd}_kernel.cuh, chosen per call by cuda/static_switch.h):
each one runs, for the forward and for the backward, and gives the right out, lse and
gradients (tests/attn_cases.check_backend: the one tolerance rule, outputs NaN-poisoned so a
row or key an even-tile kernel skips the checks of must still be written).

"Even" means L and S are whole tiles of every kernel of the call (the tile sizes are the
traits', csrc/cuda/flash_{fwd,bwd}_traits.h): the shapes below are picked on both sides of
that line, for two head-dim buckets with different tiles. Under emulation the launched
kernels' names (fused_attn_emu.last_launch_kernels) show which instantiation ran; on a GPU
(FUSED_ATTN_TEST_DEVICE=cuda) the same cases check the results only.
"""
import pytest
import torch

import fused_attn
from fused_attn.ops import _emu
from fused_attn.spec import CausalMode

from attn_cases import check_backend, make_inputs, sdpa_causal_args
from conftest import DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore:Lower right causal bias"),
              pytest.mark.usefixtures("cuda_emulation")]



# E, L, S, dtype, even forward, even backward. Tiles (rows x keys): bucket 64: forward 128 x 64,
# dK/dV 64 x 64, dQ 128 x 64; bucket 128: forward 128 x 32, dK/dV 64 x 64, dQ 128 x 32;
# bucket 160: forward 64 x 32, dK/dV 32 x 32, dQ 64 x 32.
CASES = [
    (64, 128, 192, torch.float16, True, True),      # whole tiles everywhere
    (64, 100, 150, torch.float16, False, False),    # ragged L and S
    (64, 128, 150, torch.float16, False, False),    # whole query tiles, ragged keys
    (128, 128, 96, torch.float16, True, False),     # whole forward tiles, ragged dK/dV key blocks
    (160, 64, 96, torch.bfloat16, True, True),
    (160, 70, 45, torch.bfloat16, False, False),    # L > S: lower-right leaves rows with no key
]


def _name(kernel, E, dtype, causal, even):
    return (f"{kernel}<hdim {E}, {'bf16' if dtype == torch.bfloat16 else 'fp16'}, causal {int(causal)}, "
            f"even_mn {int(even)}>")


@pytest.mark.parametrize("mode", list(CausalMode), ids=lambda m: m.name)
@pytest.mark.parametrize("E,L,S,dtype,even_fwd,even_bwd", CASES,
                         ids=[f"E{c[0]}-L{c[1]}-S{c[2]}-{'even' if c[4] else 'uneven'}" for c in CASES])
def test_every_specialisation_runs_and_matches_the_reference(mode, E, L, S, dtype, even_fwd, even_bwd):
    causal = mode != CausalMode.NONE
    q, k, v = make_inputs(1, 2, 2, L, S, E, E, dtype, device=DEVICE)
    fused_attn.attention_with_lse(q, k, v, backend="cuda", **sdpa_causal_args(mode, L, S))
    if DEVICE == "cpu":
        assert _emu.load().last_launch_kernels() == _name("flash_fwd_kernel", E, dtype, causal, even_fwd)
    check_backend("cuda", q, k, v, mode, with_lse_grad=True)
    if DEVICE == "cpu":
        assert _emu.load().last_launch_kernels() == ";".join(
            _name(kernel, E, dtype, causal, even_bwd) for kernel in ("flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel"))
