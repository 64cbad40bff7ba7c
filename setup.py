"""fused_attn build.

Pure Python (with the Triton kernels) always installs. C++ extensions are built
when torch is importable at build time, so install with
``pip install --no-build-isolation .`` after installing torch (or build in place:
``python setup.py build_ext --inplace``):

* ``fused_attn._C_cpu`` from ``csrc/cpu/*.cpp``: the binding (attention.cpp), path
  selection (isa.cpp) and test hooks (test_hooks.cpp) (any machine; skip with
  FUSED_ATTN_SKIP_CPU_BUILD=1);
* ``fused_attn._C_cuda`` from ``csrc/cuda/**`` when torch has CUDA and finds the CUDA
  toolkit (CUDA_HOME, nvcc on PATH or /usr/local/cuda; skip with FUSED_ATTN_SKIP_CUDA_BUILD=1).

Environment for the CUDA build:

* FUSED_ATTN_CUDA_ARCHS: what the kernels are compiled for, entries separated by ";" or
  ",". "80", "8.6", "90a", "100" give machine code (SASS) for that arch; a "+PTX" suffix
  also embeds the arch's PTX, which the driver compiles (JIT) for any newer GPU; "native"
  means the GPUs of this machine (sm_90 as 90a), SASS only, the quickest build. Default
  "80+PTX;86;89;90a": Ampere, Ada and Hopper SASS, and PTX from which Blackwell (10.x,
  12.x) and later GPUs JIT (the kernels use only sm_80 features: mma.sync, ldmatrix,
  cp.async; archs below 8.0 are rejected). The extension records what it was built for
  and ``fused_attn.ops.cuda`` refuses a GPU none of it can run on, saying why.
* MAX_JOBS: parallel compiler jobs of torch's ninja build (default: ninja's, about one per core).
"""
import glob
import os
import re

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # built in an isolated environment without torch: Python only
    torch = None

ARCHS_ENV = "FUSED_ATTN_CUDA_ARCHS"
DEFAULT_CUDA_ARCHS = "80+PTX;86;89;90a"
MIN_ARCH = (8, 0)


def native_archs():
    """The archs of the visible GPUs, e.g. ["90a"] on an H100 ("a": Hopper-specific SASS)."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not caps:
        raise ValueError(f"{ARCHS_ENV}=native: torch sees no CUDA device on this machine; name the archs instead, "
                         f"e.g. {ARCHS_ENV}='{DEFAULT_CUDA_ARCHS}'")
    return [f"{major}{minor}{'a' if (major, minor) == (9, 0) else ''}" for major, minor in caps]


def cuda_arch_flags(spec, native=native_archs):
    """nvcc -gencode flags for an FUSED_ATTN_CUDA_ARCHS value, and the names of what they
    build ("sm_90a" machine code, "compute_80" PTX), in order, without repeats."""
    flags, built = [], []
    entries = [e for e in re.split(r"[;,\s]+", spec.strip()) if e]
    if not entries:
        raise ValueError(f"{ARCHS_ENV} is empty; e.g. {ARCHS_ENV}='{DEFAULT_CUDA_ARCHS}' or 'native'")
    for entry in entries:
        for arch in native() if entry.lower() == "native" else [entry]:
            m = re.fullmatch(r"(\d+?)\.?(\d)([af]?)(\+ptx)?", arch, re.IGNORECASE)
            if m is None:
                raise ValueError(f"{ARCHS_ENV}: cannot read {arch!r}; entries look like 80, 8.6, 90a, 100, 80+PTX "
                                 f"or native (got {spec!r})")
            major, minor, suffix, ptx = int(m.group(1)), int(m.group(2)), m.group(3).lower(), m.group(4)
            if (major, minor) < MIN_ARCH:
                raise ValueError(f"{ARCHS_ENV}: the CUDA kernels need sm_80 or newer (mma.sync bf16, cp.async), "
                                 f"got {arch!r}")
            name = f"{major}{minor}{suffix}"
            wanted = [(f"-gencode=arch=compute_{name},code=sm_{name}", f"sm_{name}")]
            if ptx:
                wanted.append((f"-gencode=arch=compute_{name},code=compute_{name}", f"compute_{name}"))
            for flag, what in wanted:
                if what not in built:
                    flags.append(flag)
                    built.append(what)
    return flags, built


def extensions():
    if torch is None:
        return []
    ext_modules = []
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources and os.environ.get("FUSED_ATTN_SKIP_CPU_BUILD") != "1":
        # -fno-trapping-math (as torch builds): without it GCC keeps the softmax's clamps as
        # branches (a compare may trap) and leaves the portable exp2 loops scalar.
        ext_modules.append(cpp_extension.CppExtension(
            "fused_attn._C_cpu", cpu_sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"]))
    cuda_sources = sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True) + glob.glob("csrc/cuda/**/*.cpp", recursive=True))
    if (cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME is not None
            and os.environ.get("FUSED_ATTN_SKIP_CUDA_BUILD") != "1"):
        gencode, built = cuda_arch_flags(os.environ.get(ARCHS_ENV, DEFAULT_CUDA_ARCHS))
        # The binding reports what was built (fused_attn._C_cuda.built_archs) for the dispatcher.
        built_macro = "-DFUSED_ATTN_BUILT_ARCHS=" + "+".join(built)
        ext_modules.append(cpp_extension.CUDAExtension(
            "fused_attn._C_cuda", cuda_sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "--use_fast_math", "-std=c++17", built_macro] + gencode}))
    return ext_modules


if __name__ == "__main__":  # also under pip (setuptools.build_meta runs this file as __main__)
    ext_modules = extensions()
    setup(
        name="fused_attn",
        version="0.1.0",
        description="Fused attention kernels (Triton, CUDA C++, CPU) behind torch's SDPA API",
        packages=find_packages(include=["fused_attn", "fused_attn.*"]),
        package_data={"fused_attn": ["csrc/**/*"]},
        python_requires=">=3.9",
        install_requires=["torch>=2.5", "triton>=3.0", "pybind11", "ninja", "numpy"],
        # fused_attn.integrations.transformers needs transformers' mask interface of 5.4 on (q_length, q_offset)
        extras_require={"transformers": ["transformers>=5.4"],
                        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "matplotlib", "transformers>=5.4"]},
        ext_modules=ext_modules,
        cmdclass={"build_ext": cpp_extension.BuildExtension} if ext_modules else {},
    )
