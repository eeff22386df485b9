"""Process settings for the CPU work loops (labeling, sampling, training steps)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Has glibc keep freed blocks of up to 1 GiB for reuse instead of handing them back to
    the OS. By default it maps every large block afresh and unmaps it when freed (and trims
    the heap), so a CNN's activation buffers are page-faulted in again on every batch: the
    MNIST net labels faster on one thread without that (measured: BENCHMARKS.md, Labeling
    section). The cost is that a process keeps the memory of its largest batch. Returns
    whether the setting took (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    took = True
    for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        # glibc refuses a mmap threshold above its heap limit (32 MiB on some versions).
        took &= bool(mallopt(option, KEEP_BYTES) or mallopt(option, 32 << 20))
    return took
