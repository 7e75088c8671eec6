"""Process-wide runtime set-up that training, evaluation and the tools share, done once per
process before anything is compiled:

- `tune_malloc_for_cpu()`: glibc malloc tuned for XLA:CPU (first thing in a training process);
- `initialize(config)`: `jax.distributed.initialize` for multi-host runs and the persistent
  compilation cache (off for several CPU processes on jax >= 0.11);
- `make_mesh()`: the 1-D `data` mesh over every device.

Why malloc is tuned: process settings for training on the CPU backend.

XLA:CPU allocates each step's temporary buffers (hundreds of MB to GB for a DenseNet-121 step)
with malloc and frees them after the step. glibc serves blocks over 32 MB, and any large block
requested by a thread with its own arena, with a fresh mmap, and unmaps it on free, so every step
page-faults all of that memory in again: on a 2-core VM, 54 MB cost ~50 ms per use, more than the
matmul that reads it. :func:`tune_malloc` keeps freed memory mapped for reuse instead.

Training on the CPU calls it (:func:`tune_malloc_for_cpu`, first thing in ``isimed-pretrain`` /
``main.py``): measured on the loaded 2-core machine, two processes side by side, the demo
preset's step (small CNN, 128 crops of 16^3) took a median 0.48 s tuned against 0.90 s untuned
(best 0.24 s against 0.51 s). Tuning after JAX has started its backend gains nothing (0.88 s):
XLA:CPU's threads already have malloc arenas of their own. Not on accelerator hosts: one arena
for all threads would serialise the host input pipeline's allocations there.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

import jax
import ml_collections

from isimed import paths

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely."


def tune_malloc() -> bool:
    """Make glibc reuse freed memory instead of returning it to the OS; returns whether it could.

    Sets M_ARENA_MAX=1 (one heap for all threads), M_MMAP_MAX=0 (no mmap for large blocks) and
    M_TRIM_THRESHOLD=-1 (the heap is never trimmed: freed memory is not unmapped). A 2 GiB
    threshold, as before, was not enough for DenseNet-121 at 128 crops of 32^3 on the CPU: the
    step frees ~3.4 GB at the heap's top, which was trimmed and faulted in again every step
    (20-23 crops/s against 36-37 never trimmed, in one run).
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
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, NEVER_TRIM))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def cpu_only() -> bool:
    """Whether JAX will compute on the CPU alone, decided without starting its backends: the
    ``jax_platforms`` setting (``JAX_PLATFORMS``) is ``cpu``, or none is set and no accelerator
    plugin (a ``jax_plugins`` entry point or module, libtpu) is installed."""
    # Reading the config starts no backend.
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def tune_malloc_for_cpu() -> bool:
    """:func:`tune_malloc` where JAX will compute on the CPU alone (:func:`cpu_only`); returns
    whether it tuned. Call it first thing in a training process, before JAX runs anything."""
    return cpu_only() and tune_malloc()


def initialize(config: ml_collections.ConfigDict) -> None:
    """Process-wide JAX setup, before anything is compiled: `jax.distributed.initialize` for
    `config.distributed` (unset fields auto-detected) and the persistent compilation cache in
    `config.compilation_cache_dir` (a rerun or resume then loads compiled programs instead of
    compiling them again; None: off). With jax >= 0.11, several CPU processes compile afresh,
    cache off: with jax 0.12.1 two CPU processes hung in their first collective whenever they read
    their programs back from the cache (both inside gloo's all-gather; 9 runs of 9), and finished
    whenever they compiled them (6 of 6). jax 0.10 reads them back correctly (CI's two-process
    runs), and compiling afresh cost its two-process tests ~2 minutes."""
    if config.get("distributed") and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=config.get("coordinator_address"),
            num_processes=config.get("num_processes"),
            process_id=config.get("process_id"),
        )
    if jax.__version_info__ >= (0, 11) and jax.process_count() > 1 and cpu_only():
        jax.config.update("jax_enable_compilation_cache", False)  # Also JAX_COMPILATION_CACHE_DIR's.
    elif config.get("compilation_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", os.fspath(paths.resolve(config.compilation_cache_dir)))


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device. Auto axes: XLA propagates shardings (the batch is split on
    `data`, parameters are replicated, pairwise-distance matrices are gathered as needed)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
