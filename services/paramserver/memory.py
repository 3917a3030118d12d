"""Process memory tuning for a shard: tensor messages are allocated and freed on every pull and push."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems.
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory(keep_mib: int) -> bool:
    """Make glibc's malloc reuse freed message buffers instead of mapping fresh memory for each one.

    By default glibc maps every allocation of at least its (dynamic) mmap threshold afresh and unmaps it
    on free, and returns the top of its heap to the OS once more than a trim threshold is free: a 4 MiB
    message is then new memory every time, a page fault per 4 KiB. With allocations up to 32 MiB served
    from the heap and up to ``keep_mib`` MiB of freed memory kept, the same buffers are reused. Returns
    False, changing nothing, for ``keep_mib == 0`` or where the C library is not glibc.
    """
    if keep_mib <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("malloc is not glibc's: heap_keep_mib has no effect")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, keep_mib << 20) == 1
    if not kept:
        log.warning("mallopt refused the heap settings: heap_keep_mib has no effect")
    return kept
