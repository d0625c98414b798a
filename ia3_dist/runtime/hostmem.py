"""Host (CPU) memory of this process: resident size now and at peak, and glibc's allocator policy."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from functools import cache

M_MMAP_THRESHOLD = -3
LEAN_MMAP_THRESHOLD = 64 * 1024


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
        lib.mallopt  # noqa: B018 - glibc only; musl and macOS have no mallopt/malloc_trim
        lib.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return lib


def lean_malloc() -> bool:
    """Serve every allocation of 64 KiB or more by its own mmap, unmapped on free. glibc otherwise raises its
    mmap threshold after the first large free (up to 32 MiB) and keeps freed blocks in the heap: under ZeRO-3 each
    layer gathered and released leaves its buffer behind, and RSS grows toward a full copy of the model.
    Returns False where the C library is not glibc (nothing changed)."""
    lib = _libc()
    return bool(lib is not None and lib.mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD))


def trim() -> None:
    """Return free heap pages to the OS (after loading: construction buffers are dead weight from then on)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def rss_gib() -> float:
    """Resident set size now."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**30


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
