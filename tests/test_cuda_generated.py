"""The checked-in CUDA specialisation files are what fused_attn/tools/gen_cuda_kernels.py
writes from its one list of head-dim buckets, dtypes and flags (fast: no compiler runs)."""
import glob
import itertools
import re

from fused_attn.tools import cuda_compile_table as cct
from fused_attn.tools import gen_cuda_kernels as gen


def test_checked_in_files_are_generated():
    assert gen.stale() == [], ("out of date with fused_attn/tools/gen_cuda_kernels.py (rerun "
                               "`python -m fused_attn.tools.gen_cuda_kernels`): " + ", ".join(gen.stale()))


def test_builds_compile_every_instantiation():
    """setup.py's glob and the compile table's translation units hold every generated instantiation."""
    made = {p for p in gen.generate() if p.suffix == ".cu"}
    assert made <= set(cct.translation_units())
    assert {str(p) for p in made} <= set(glob.glob(str(gen.ROOT / "csrc/cuda/**/*.cu"), recursive=True))


def test_lists_agree():
    """The switch's buckets, the instantiations and the manifest come from the same lists."""
    files = gen.generate()
    assert f"kHeadDimBuckets[] = {{{', '.join(map(str, gen.HEAD_DIMS))}}}" in files[gen.GENERATED / "kernel_list.h"]
    manifest = files[gen.GENERATED / "kernel_manifest.h"]
    combos = 2 ** len(gen.FLAGS)
    for kernel in ("flash_fwd_kernel", "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel"):
        assert len(re.findall(rf'"{kernel}<', manifest)) == len(gen.HEAD_DIMS) * len(gen.DTYPES) * combos
    externs = files[gen.GENERATED / "kernel_externs.h"]
    for d, (_, bf16), flags in itertools.product(gen.HEAD_DIMS, gen.DTYPES.values(), gen.flag_values()):
        assert f"run_flash_fwd<FwdTraits<{d}, {bf16}>, {', '.join(flags)}>" in externs
        assert f"run_flash_bwd<{d}, {bf16}, {', '.join(flags)}>" in externs
