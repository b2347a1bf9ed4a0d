"""Giving memory that the process has freed back to the operating system.

glibc's malloc serves every allocation below its mmap threshold from heaps that it rarely
shrinks, and raises that threshold up to 32 MB each time a larger block is freed. In a
layer-by-layer loop a layer's buffers are freed in another order than they were made, so holes
stay resident between the blocks still in use, and each later layer adds more: resident memory
grows with the number of layers although live memory does not. Two settings keep it that of one
layer: blocks from 4 MiB up get their own mappings (returned to the system when freed, and the
threshold no longer rises), and after each layer malloc hands back every free page it holds.
Where the C library is not glibc (macOS, musl, Windows) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MMAP_THRESHOLD = 4 << 20  # bytes; blocks of this size and more are mapped on their own
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has ``malloc_trim`` and ``mallopt``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        trim, opt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    opt.argtypes, opt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def map_large_blocks() -> bool:
    """Serve allocations of :data:`MMAP_THRESHOLD` bytes and more by their own mappings.

    Process-wide and idempotent; returns ``True`` if the C library took the setting.
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def release_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the system; ``True`` if the C library could."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
