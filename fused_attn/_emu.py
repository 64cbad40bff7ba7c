"""Builds and loads the CPU emulator of the CUDA kernels (module ``fused_attn_emu``).

The kernels in ``csrc/cuda`` and the primitive probes in ``csrc/emu`` are compiled
as C++ with ``FUSED_ATTN_EMULATE`` (see ``csrc/emu/runtime.h``) by
``torch.utils.cpp_extension.load`` with ninja on first use. Build directory:
``$TORCH_EXTENSIONS_DIR/fused_attn_emu`` if set, else ``<repo>/build/emu``.
``FUSED_ATTN_EMU_VERBOSE=1`` shows the compiler commands; ``FUSED_ATTN_EMU_THREADS``
sets how many OS threads run blocks (default: up to 4).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("emu/runtime.cpp", "emu/emu_module.cpp", "emu/flash_fwd_emu_fp16.cpp", "emu/flash_fwd_emu_bf16.cpp",
           "emu/flash_bwd_emu_fp16.cpp", "emu/flash_bwd_emu_bf16.cpp")
_lock = threading.Lock()
_module = None


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) / "fused_attn_emu" if root else CSRC.parent / "build" / "emu"


def sources():
    return [str(CSRC / s) for s in SOURCES]


def load():
    """The compiled emulator module (built on first call; ninja rebuilds what changed)."""
    global _module
    with _lock:
        if _module is None:
            if not (CSRC / "emu" / "runtime.cpp").is_file():
                raise ImportError(f"the CUDA emulator needs the csrc/ sources next to the package, not found at {CSRC}")
            from torch.utils.cpp_extension import load as cpp_load

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            _module = cpp_load(
                name="fused_attn_emu",
                sources=sources(),
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O2", "-DFUSED_ATTN_EMULATE", "-Wno-unknown-pragmas"],
                build_directory=str(d),
                verbose=os.environ.get("FUSED_ATTN_EMU_VERBOSE") == "1",
            )
    return _module
