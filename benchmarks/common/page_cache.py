"""A model file's pages in the OS page cache: dropped, and counted.

A cold start right after a restart reads the weights from disk; one after an unload finds them
in the page cache. The benchmarks measure both. `posix_fadvise(DONTNEED)` drops one file's
clean pages without root (unlike /proc/sys/vm/drop_caches) and without touching the rest of the
machine's cache; `mincore` on a fresh mapping says how much of the file is still resident, so a
report shows the drop happened (pages mapped by a running process cannot be dropped).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_MAP_FAILED = ctypes.c_void_p(-1).value


def drop_pages(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache now (0.0 to 1.0); mapping a file reads none
    of it, so asking does not change the answer."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vector) / pages


def cached_share(path: Path, drop: bool) -> float:
    """The file's share in the page cache, after dropping its pages if `drop`."""
    if drop:
        drop_pages(path)
    return resident_fraction(path)
