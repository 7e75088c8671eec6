"""Process settings for training on the CPU backend.

XLA:CPU allocates each step's temporary buffers (hundreds of MB to GB for a DenseNet-121 step)
with malloc and frees them after the step. glibc serves blocks over 32 MB, and any large block
requested by a thread with its own arena, with a fresh mmap, and unmaps it on free, so every step
page-faults all of that memory in again: on a 2-core VM, 54 MB cost ~50 ms per use, more than the
matmul that reads it. :func:`tune_malloc` keeps freed memory mapped for reuse instead.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # bytes: freed memory stays mapped up to 2 GiB past the heap's top.


def tune_malloc() -> bool:
    """Make glibc reuse freed memory instead of returning it to the OS; returns whether it could.

    Sets M_ARENA_MAX=1 (one heap for all threads), M_MMAP_MAX=0 (no mmap for large blocks) and
    M_TRIM_THRESHOLD=2 GiB (freed memory is not unmapped), as the environment variables
    ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` would at start-up.
    The process keeps its peak heap for its lifetime, which suits a training or benchmark process.

    Call it first, before JAX (or PyTorch) runs anything: a thread that already has a malloc arena
    of its own keeps it, and glibc maps large blocks for such arenas regardless. Does nothing and
    returns False where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
