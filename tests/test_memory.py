"""Buffer allocation: cache-line alignment always; large host buffers in huge pages, each
starting a different multiple of ``stagger_bytes(itemsize)`` after a 2 MiB boundary (512 bytes,
128 for 16-bit elements)."""

import ml_dtypes
import numpy as np
import pytest

import fastopt as fo
from fastopt import memory

LARGE = memory.HUGE_PAGE_MIN_BYTES // 4  # float32 elements at the huge-page threshold


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, ml_dtypes.bfloat16, np.float16, np.uint8]
)
@pytest.mark.parametrize("n", [0, 1, 17, 1000, LARGE - 1, LARGE, 3 * LARGE + 5])
def test_aligned_zeros(n, dtype):
    a = memory.aligned_zeros(n, dtype)
    nbytes = n * np.dtype(dtype).itemsize
    assert a.shape == (n,) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    expected = memory.HUGE_PAGE if nbytes >= memory.HUGE_PAGE_MIN_BYTES else memory.CACHE_LINE
    assert memory.alignment_for(nbytes) == expected
    if n:  # an empty array has no data to align
        assert memory.alignment_of(a) >= memory.CACHE_LINE
        if expected == memory.HUGE_PAGE:
            assert _staggered(a)


def _staggered(a):
    step = memory.stagger_bytes(a.itemsize)
    offset = memory.huge_page_offset(a)
    return offset % step == 0 and step <= offset <= step * memory.STAGGER_SLOTS


def test_stagger_steps():
    """512 bytes between starts, 128 for 16-bit elements (measured in fastopt/memory.py)."""
    assert [memory.stagger_bytes(s) for s in (1, 2, 4, 8)] == [512, 128, 512, 512]
    assert memory.STAGGER_16BIT * memory.STAGGER_SLOTS < 4096 - 64  # distinct modulo 4 KiB


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_consecutive_large_buffers_start_at_different_offsets_modulo_4_kib(dtype):
    """Buffers a kernel streams together must not alias modulo 4 KiB (fastopt/memory.py)."""
    n = memory.HUGE_PAGE_MIN_BYTES // np.dtype(dtype).itemsize
    arrays = [memory.aligned_zeros(n, dtype) for _ in range(memory.STAGGER_SLOTS)]
    offsets = {a.ctypes.data % 4096 for a in arrays}
    assert len(offsets) == memory.STAGGER_SLOTS and 16 not in offsets and 0 not in offsets
    assert all(_staggered(a) for a in arrays)


def test_alignment_for_device_arrays_is_a_cache_line():
    class FakeCupy:  # any module other than NumPy: device memory, no huge pages to ask for
        pass

    assert memory.alignment_for(1 << 30, FakeCupy) == memory.CACHE_LINE


def test_large_paramset_and_optimizer_state_are_huge_page_aligned():
    ps = fo.ParamSet({"w": np.ones((LARGE // 2, 2), np.float32), "b": np.ones(3, np.float32)})
    opt = fo.Adam(ps)
    ps.grad_flat[...] = 1
    opt.step()
    (state,) = opt.state.values()
    buffers = (ps.flat, ps.grad_flat, state["exp_avg"], state["exp_avg_sq"])
    assert all(_staggered(a) for a in buffers)
    assert len({a.ctypes.data % 4096 for a in buffers}) == len(buffers)
    assert np.all(ps["b"] < 1) and np.all(ps["w"] < 1)  # the step went through


def test_bfloat16_paramset_and_state_are_staggered_by_128_bytes():
    ps = fo.ParamSet({"w": np.ones(2 * LARGE, np.float32)}, dtype=ml_dtypes.bfloat16)
    opt = fo.AdamW(ps)
    ps.grad_flat[...] = 1
    opt.step()
    (state,) = opt.state.values()
    buffers = (ps.flat, ps.grad_flat, state["exp_avg"], state["exp_avg_sq"])
    assert all(a.dtype == ml_dtypes.bfloat16 and _staggered(a) for a in buffers)
    offsets = sorted(memory.huge_page_offset(a) for a in buffers)
    assert len(set(offsets)) == 4 and offsets[-1] <= 128 * memory.STAGGER_SLOTS


def test_state_of_plain_large_arrays_is_huge_page_aligned_and_small_ones_a_cache_line():
    big, small = np.ones(LARGE, np.float32), np.ones(10, np.float32)
    opt = fo.AdamW([big, small])
    opt.step([np.ones_like(big), np.ones_like(small)])
    assert _staggered(opt.state[0]["exp_avg_sq"])
    assert memory.alignment_of(opt.state[1]["exp_avg_sq"]) >= memory.CACHE_LINE
