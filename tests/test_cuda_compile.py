"""nvcc compiles every CUDA kernel for sm_80, sm_90a and (from the compute_80 PTX, as the
driver's JIT would) sm_120 with no spills and within limits.

Runs fused_attn/tools/cuda_compile_table.py (nothing is executed on a GPU). Skipped
only when nvcc is absent; CI and the dev machine have it.
"""
import runpy
from pathlib import Path

import pytest

from fused_attn.tools import cuda_compile_table as cct
from fused_attn.tools import gen_cuda_kernels as gen

SPILLING_PTXAS = """\
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    32 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 49152 bytes smem, 368 bytes cmem[0]
"""


def test_parser_flags_spills_and_shared_memory():
    (row,) = cct.parse_ptxas(SPILLING_PTXAS)
    assert (row.registers, row.static_smem, row.stack, row.spill_stores, row.spill_loads) == (255, 49152, 32, 24, 16)
    row.dynamic_smem = 130 * 1024  # 48 KiB static + 130 KiB dynamic > 163 KiB on sm_80
    cct.check(row, {})
    assert any("spills" in p for p in row.problems)
    assert any("shared memory" in p for p in row.problems)


def test_table_compiles_what_setup_py_ships():
    """Machine code for the archs setup.py builds by default; every other arch from its PTX."""
    setup_py = runpy.run_path(str(Path(cct.ROOT) / "setup.py"), run_name="fused_attn_setup")
    _, built = setup_py["cuda_arch_flags"](setup_py["DEFAULT_CUDA_ARCHS"])
    assert sorted(built) == sorted([f"sm_{a}" for a in cct.SASS_ARCHS] + [f"compute_{cct.PTX_ARCH}"])
    assert cct.gencode("90a") == "-gencode=arch=compute_90a,code=sm_90a"
    assert cct.gencode("120") == "-gencode=arch=compute_80,code=sm_120"
    assert cct.gencode("80", "120") == "-gencode=arch=compute_80,code=[sm_80,sm_120]"
    assert cct.ptx_groups(("80", "90a", "120")) == [("80", "120"), ("90a",)]
    with pytest.raises(ValueError, match="different PTX"):
        cct.gencode("80", "90a")
    with pytest.raises(ValueError, match="unknown arch 75; choose from 80, 86"):
        cct.compile_table(("75",))


@pytest.mark.slow  # nvcc over every kernel and arch
@pytest.mark.skipif(cct.nvcc_path() is None, reason="nvcc not found: cannot compile the CUDA kernels")
def test_every_kernel_compiles_for_every_arch_without_spills(capsys):
    """Also compiles the torch binding (csrc/cuda/binding/) against torch's headers."""
    assert cct.translation_units(cct.BINDING_UNITS), "the torch binding source is missing"
    rows, problems = cct.compile_table()
    table = cct.format_table(rows)
    with capsys.disabled():  # the table belongs in the CI log
        print("\n" + table)
    assert not problems, "\n".join(problems) + "\n\n" + table
    assert {r.arch for r in rows} == set(cct.ARCHS)
    kernels = {r.kernel for r in rows}
    assert any("probe_mma<__nv_bfloat16>" in k for k in kernels) and any("probe_ldmatrix<4, true>" in k for k in kernels)
    # every forward instantiation (head-dim bucket x dtype x causal / even-tile flags) was compiled for every
    # arch, with its launch shape
    fwd = [r for r in rows if "flash_fwd_kernel" in r.kernel]
    per_arch = len(gen.HEAD_DIMS) * len(gen.DTYPES) * 2 ** len(gen.FLAGS)
    assert len(fwd) == per_arch * len(cct.ARCHS) and all(r.dynamic_smem and r.threads for r in fwd)
