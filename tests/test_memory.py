"""Tests of saelab.memory: free heap pages go back to the OS."""

from __future__ import annotations

import ctypes
import os

import pytest
from saelab.memory import _glibc, release_free_heap


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_glibc() is None, reason="needs glibc")
def test_release_free_heap_returns_fragmented_free_pages() -> None:
    libc = _glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 96 * 1024  # under the mmap threshold: heap memory
    blocks = []
    for _ in range(1200):  # ~112 MiB of touched heap blocks
        blocks.append(libc.malloc(block))
        ctypes.memset(blocks[-1], 1, block)
    for address in blocks[::2]:  # every other one: free chunks pinned between live ones
        libc.free(address)
    before = _rss_bytes()
    assert release_free_heap()
    released = before - _rss_bytes()
    for address in blocks[1::2]:
        libc.free(address)
    assert released > 40 * 2**20, f"only {released / 2**20:.1f} MiB released"
