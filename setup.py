"""fused_attn build.

Pure Python (with the Triton kernels) always installs. C++ extensions are built
when torch is importable at build time, so install with
``pip install --no-build-isolation .`` after installing torch:

* ``fused_attn._C_cpu`` from ``csrc/cpu/*.cpp`` (any machine; skip with
  FUSED_ATTN_SKIP_CPU_BUILD=1);
* ``fused_attn._C_cuda`` from ``csrc/cuda/**`` when torch has CUDA and nvcc is found
  (skip with FUSED_ATTN_SKIP_CUDA_BUILD=1; archs from FUSED_ATTN_CUDA_ARCHS, default
  "80;86;89;90"; parallel jobs from MAX_JOBS).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # built in an isolated environment without torch: Python only
    torch = None

if torch is not None:
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources and os.environ.get("FUSED_ATTN_SKIP_CPU_BUILD") != "1":
        ext_modules.append(cpp_extension.CppExtension(
            "fused_attn._C_cpu", cpu_sources, extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast"],
            extra_link_args=["-fopenmp"]))
    cuda_sources = sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True) + glob.glob("csrc/cuda/**/*.cpp", recursive=True))
    have_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    if (cuda_sources and torch.version.cuda and have_nvcc
            and os.environ.get("FUSED_ATTN_SKIP_CUDA_BUILD") != "1"):
        archs = os.environ.get("FUSED_ATTN_CUDA_ARCHS", "80;86;89;90").split(";")
        gencode = []
        for a in archs:
            a = a.strip()
            code = f"sm_{a}a" if a == "90" else f"sm_{a}"
            gencode += [f"-gencode=arch=compute_{a}{'a' if a == '90' else ''},code={code}"]
        ext_modules.append(cpp_extension.CUDAExtension(
            "fused_attn._C_cuda", cuda_sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-std=c++17"] + gencode}))
    if ext_modules:
        cmdclass["build_ext"] = cpp_extension.BuildExtension

setup(
    name="fused_attn",
    version="0.1.0",
    description="Fused attention kernels (Triton, CUDA C++, CPU) behind torch's SDPA API",
    packages=find_packages(include=["fused_attn", "fused_attn.*"]),
    package_data={"fused_attn": ["csrc/**/*"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "triton>=3.0", "pybind11", "ninja", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
