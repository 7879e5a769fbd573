"""Allocation of the flat buffers fastopt owns: ParamSet buffers and optimizer state, and what
the optimizer state takes (:func:`state_nbytes`, :func:`state_bytes_per_parameter`).

Every buffer starts on a cache line (64 bytes). Host buffers of at least ``HUGE_PAGE_MIN_BYTES``
also start within the first ``STAGGER_SLOTS`` multiples of :func:`stagger_bytes` after a 2 MiB
boundary (each a different multiple), so that transparent huge pages can back them
(NumPy asks the kernel for huge pages on large allocations; see
``numpy._core.multiarray._get_madvise_hugepage``). NumPy's and torch's allocators align large
buffers to 64 bytes only. On the 2-core AMD EPYC (Zen 4, KVM) the benchmarks ran on, an Adam step
over 16 Mi float32 elements with 64-byte-aligned buffers took up to 1.4x as long as with 2 MiB-
aligned ones on 1 thread, and up to 1.1x on 2 (``bench/test_bench_layout.py``; figures in
``bench/results/other-2026-11-21.md``). The slack before the aligned start is never touched, so it
costs address space, not memory.
"""

import itertools

import numpy as np

CACHE_LINE = 64
"""Byte alignment of every buffer (a cache line; vector loads never straddle two)."""

HUGE_PAGE = 2 << 20
"""Byte alignment of large host buffers: one x86-64 / arm64 transparent huge page."""

HUGE_PAGE_MIN_BYTES = 4 << 20
"""Host buffers from this size on are huge-page aligned (NumPy's own threshold for asking the
kernel for huge pages is 4 MiB too)."""


STAGGER = 512
"""Bytes between the starts of consecutive huge-page buffers within their first 2 MiB page, for
elements of 1, 4 or 8 bytes (:func:`stagger_bytes`)."""

STAGGER_16BIT = 128
"""The same for 16-bit elements (bfloat16, float16)."""

STAGGER_SLOTS = 7
"""Distinct starts: buffer ``k`` begins ``(1 + k % STAGGER_SLOTS) * stagger_bytes(itemsize)``
bytes after a 2 MiB boundary (never on it, nor within a cache line of the 16 bytes past a page
boundary where large NumPy arrays start, which a kernel may stream beside ours). A kernel streams
several buffers at the same index; had they all started at one offset in their pages, their
elements ``i`` would share an address modulo 4 KiB, and a store to one and a load from another
look alike to the CPU's store-to-load check (4K aliasing). On a 2-core AMD EPYC (Zen 2), AdamW
over a 16 Mi-element float32 NumPy array (16 bytes into its page) with its moments on 2 MiB
boundaries took 30.8 ms on one thread and 16.7 ms on two; with the moments 512 bytes apart 16.7
and 10.7 ms. Over a ParamSet (every buffer fastopt's): 16.5 against 15.8 ms, and 15.0 against
14.3 (in-process A/B, interleaved).

16-bit buffers are staggered by less: with 512 bytes, a bfloat16 AdamW step over a 16 Mi-element
ParamSet took 11.0-11.2 ms on an Intel Xeon with AVX-512 (2026-12-02), against 8.0 ms with
every buffer on the boundary and 7.4-7.6 ms with starts 128 bytes apart; float16 11.0 against
7.6-7.7 ms, a NumPy bfloat16 parameter with fastopt's moments 9.4 against 7.7 ms (in-process
A/B, two threads; ``bench/results/xeon-2026-12-02.md``). On that CPU float32 and 8-bit codes
gained nothing from 128 or 256 bytes (0.98-1.02x), so they keep 512. The buffers still lie in
huge pages but for their last partial page."""


def stagger_bytes(itemsize):
    """Bytes between the starts of consecutive huge-page buffers of ``itemsize``-byte elements."""
    return STAGGER_16BIT if itemsize == 2 else STAGGER


_STARTS = itertools.count()


def alignment_for(nbytes, xp=np):
    """The byte alignment :func:`aligned_zeros` gives a buffer of ``nbytes`` bytes."""
    if xp is np and nbytes >= HUGE_PAGE_MIN_BYTES:
        return HUGE_PAGE
    return CACHE_LINE


def alignment_of(a):
    """The largest power of two dividing the data address of the NumPy array ``a``."""
    ptr = a.ctypes.data
    return ptr & -ptr


def aligned_zeros(n, dtype, xp=np):
    """A zeroed, contiguous 1-D array of ``n`` elements of ``xp`` (NumPy or CuPy), aligned as
    :func:`alignment_for` says."""
    dtype = np.dtype(dtype)
    align = alignment_for(n * dtype.itemsize, xp)
    offset = 0
    if align == HUGE_PAGE:
        offset = (1 + next(_STARTS) % STAGGER_SLOTS) * stagger_bytes(dtype.itemsize)
    pad = (align + offset) // dtype.itemsize
    raw = xp.zeros(n + pad, dtype=dtype)
    ptr = raw.data.ptr if xp is not np else raw.ctypes.data
    start = ((-ptr % align) + offset) // dtype.itemsize
    return raw[start : start + n]


def huge_page_offset(a):
    """Bytes from the last 2 MiB boundary to the start of NumPy array ``a``: a multiple of
    ``stagger_bytes(a.itemsize)`` from one to ``STAGGER_SLOTS`` of them for a buffer of
    :func:`aligned_zeros` of at least ``HUGE_PAGE_MIN_BYTES``."""
    return a.ctypes.data % HUGE_PAGE


def state_nbytes(optimizer):
    """Bytes of per-element optimizer state of ``optimizer`` allocated so far (state exists
    after a unit's first step): every state array, the codes and block absmax of 8-bit slots,
    float32 master copies; host scalars not counted."""
    total = 0
    for unit in optimizer.units():
        for value in unit.state.values():
            nbytes = getattr(value, "nbytes", None)
            if nbytes is not None and not isinstance(value, (int, float, np.generic)):
                total += int(nbytes)
    return total


def state_bytes_per_parameter(optimizer):
    """:func:`state_nbytes` over the number of parameter elements whose state exists: Adam
    keeps 8 bytes per parameter in float32, 4 in bfloat16, about 2.03 with ``state_dtype="int8"``
    (2 codes and 2 float32 absmax per 256 elements)."""
    elements = sum(int(u.param.size) for u in optimizer.units() if u.state)
    return state_nbytes(optimizer) / elements if elements else 0.0
