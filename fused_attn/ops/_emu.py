"""Builds and loads the CPU emulator of the CUDA kernels (module ``fused_attn_emu``).

The kernels in ``csrc/cuda`` and the primitive probes in ``csrc/emu`` are compiled
as C++ with ``FUSED_ATTN_EMULATE`` (see ``csrc/emu/runtime.h``: scheduling, bounds and
shared-memory race tracking) by ``torch.utils.cpp_extension.load`` with ninja on first
use. Build directory: ``$TORCH_EXTENSIONS_DIR/fused_attn_emu`` if set, else
``<repo>/build/emu``. ``FUSED_ATTN_EMU_VERBOSE=1`` shows the compiler commands;
``FUSED_ATTN_EMU_THREADS`` sets how many OS threads run blocks (default: up to 4).
``build`` compiles other emulator modules the same way (the race tests' mutant kernels).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NAME = "fused_attn_emu"
SOURCES = ("emu/runtime.cpp", "emu/emu_module.cpp", "emu/flash_fwd_emu_fp16.cpp", "emu/flash_fwd_emu_bf16.cpp",
           "emu/flash_bwd_emu_fp16.cpp", "emu/flash_bwd_emu_bf16.cpp")
CFLAGS = ("-O2", "-DFUSED_ATTN_EMULATE", "-Wno-unknown-pragmas")
_lock = threading.Lock()
_module = None


def build_dir(name: str = NAME) -> Path:
    """Where module `name` is built: $TORCH_EXTENSIONS_DIR/<name>, else <repo>/build/emu[_<suffix>]."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / name
    return CSRC.parent / "build" / ("emu" + name[len(NAME):] if name.startswith(NAME) else name)


def sources():
    return [str(CSRC / s) for s in SOURCES]


def build(name: str, srcs: Iterable[str], include_dirs: Iterable[str] = ()):
    """Compiles `srcs` (paths; csrc/ and `include_dirs` on the include path) with the emulator's
    flags into the extension module `name`, in build_dir(name); ninja rebuilds what changed."""
    if not (CSRC / "emu" / "runtime.cpp").is_file():
        raise ImportError(f"the CUDA emulator needs the csrc/ sources next to the package, not found at {CSRC}")
    from torch.utils.cpp_extension import load as cpp_load

    d = build_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    return cpp_load(
        name=name,
        sources=[str(s) for s in srcs],
        extra_include_paths=[str(CSRC), *map(str, include_dirs)],
        extra_cflags=list(CFLAGS),
        build_directory=str(d),
        verbose=os.environ.get("FUSED_ATTN_EMU_VERBOSE") == "1",
    )


def load():
    """The compiled emulator module (built on first call; ninja rebuilds what changed)."""
    global _module
    with _lock:
        if _module is None:
            _module = build(NAME, sources())
    return _module
