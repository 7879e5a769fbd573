"""The pack helpers of kernels/packed_loops.py (numba-cuda's storage loops) as plain Python on
NumPy arrays, as the CUDA simulator runs them: a 16-bit array's alignment to its 8-byte words is
read from its address; a whole pack read as one word and written back as one gives the elements
the element-by-element path gives; a partial pack touches only its own elements. The kernels
themselves: tests/test_storage_sim.py (the CPU's bits at every alignment, in the simulator) and
tests/test_gpu_launch.py (8-byte accesses in the PTX)."""

import numpy as np
import pytest

from fastopt.kernels import access, packed_loops

PACK = packed_loops.PACK


def _helpers(storage="bfloat16"):
    """The helpers ``bind`` makes, undecorated (plain Python)."""
    st = access.Storage(storage, storage, storage, False, False)
    return packed_loops.bind(st, lambda fn: fn)


def test_alignment_is_read_from_the_address():
    h = _helpers()
    base = np.zeros(16, np.uint16)
    assert base.ctypes.data % 8 == 0  # NumPy allocates on 16-byte boundaries
    assert [bool(h["aligned_p"](base[k:])) for k in range(6)] == [1, 0, 0, 0, 1, 0]
    f32 = _helpers("float32")
    assert f32["aligned_p"](np.zeros(8, np.float32)[1:])  # plain arrays are read elementwise


@pytest.mark.parametrize("q", [0, 2])
def test_a_word_holds_the_elements_of_its_pack(q):
    h = _helpers()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1 << 16, 12).astype(np.uint16)
    words = a.view(np.uint64)
    wide, narrow = np.zeros(PACK, np.uint16), np.zeros(PACK, np.uint16)
    h["unpack_p"](a, words, q, PACK, True, wide)
    h["unpack_p"](a, words, q, PACK, False, narrow)
    assert wide.tolist() == narrow.tolist() == a[q * PACK : (q + 1) * PACK].tolist()
    new = np.array([1, 0xFFFF, 0x8000, 7], np.uint16)
    b, c = a.copy(), a.copy()
    h["pack_p"](b, b.view(np.uint64), q, PACK, True, new)
    h["pack_p"](c, c.view(np.uint64), q, PACK, False, new)
    expected = a.copy()
    expected[q * PACK : (q + 1) * PACK] = new
    assert b.tolist() == c.tolist() == expected.tolist()


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_a_partial_pack_touches_its_elements_only(storage):
    """The last pack of 10 elements holds 2: elements 8 and 9 are read and written, the
    locals past them and the memory past the array are left alone."""
    h = _helpers(storage)
    dtype = np.uint16 if storage == "bfloat16" else np.float32
    buf = np.arange(1, 13).astype(dtype)
    a = buf[:10]
    loc = np.full(PACK, 99, dtype)
    h["unpack_p"](a, a[:8].view(np.uint64), 2, 2, False, loc)
    assert loc.tolist() == [9, 10, 99, 99]
    h["pack_p"](a, a[:8].view(np.uint64), 2, 2, False, np.array([50, 60, 70, 80], dtype))
    assert buf.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 50, 60, 11, 12]


def test_without_master_weights_w_is_left_alone():
    """Without a master copy ``w`` is ``p`` itself: its pack helpers do nothing, so ``p`` is
    written once, by ``pack_p``."""
    h = _helpers()
    p = np.arange(8, dtype=np.uint16)
    loc = np.full(PACK, 5, np.float32)
    h["unpack_w"](p, p.view(np.uint64), 0, PACK, True, loc)
    h["pack_w"](p, p.view(np.uint64), 0, PACK, True, np.zeros(PACK, np.float32))
    assert loc.tolist() == [5] * PACK and p.tolist() == list(range(8))
    st = access.Storage("bfloat16", "bfloat16", "float32", True, False)
    master = packed_loops.bind(st, lambda fn: fn)
    assert master["W_T"] is np.float32 and master["P_T"] is np.uint16
