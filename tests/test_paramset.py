import numpy as np
import pytest

import fastopt as fo
from fastopt.memory import CACHE_LINE


def test_views_layout_and_alignment():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(3, dtype=np.float32)
    ps = fo.ParamSet({"w": w, "b": b})
    assert len(ps) == 2 and list(ps) == ["w", "b"] and ps.names == ["w", "b"]
    assert ps.shapes == {"w": (3, 4), "b": (3,)}
    assert ps.size == 15 and ps.dtype == np.float32
    assert ps.offsets == {"w": (0, 12), "b": (12, 15)}
    assert np.array_equal(ps["w"], w) and np.array_equal(ps["b"], b)
    assert ps.flat.ctypes.data % CACHE_LINE == 0 and ps.grad_flat.ctypes.data % CACHE_LINE == 0
    assert np.shares_memory(ps["w"], ps.flat) and np.shares_memory(ps.grads["b"], ps.grad_flat)
    ps["w"][0, 0] = 42
    assert ps.flat[0] == 42 and w[0, 0] == 0  # values were copied in
    ps.grads["b"] = [1, 2, 3]
    assert np.array_equal(ps.grad_flat[12:], [1, 2, 3])
    ps.zero_grad()
    assert not ps.grad_flat.any()
    assert "ParamSet" in repr(ps) and "w: (3, 4)" in repr(ps)


def test_dtype_conversion_and_to_dict():
    ps = fo.ParamSet({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, dtype=np.float64)
    assert ps.dtype == np.float64
    d = ps.to_dict()
    d["a"][0] = 7
    assert ps["a"][0] == 1


def test_optimizer_zero_grad_clears_paramset_buffers():
    ps = fo.ParamSet({"a": np.ones(4)})
    opt = fo.SGD(ps, lr=0.1)
    ps.grad_flat[...] = 3
    opt.zero_grad()
    assert not ps.grad_flat.any()


def test_flat_gradient_can_be_passed_explicitly():
    ps = fo.ParamSet({"a": np.zeros(4), "b": np.zeros((2, 2))})
    opt = fo.SGD(ps, lr=0.5)
    opt.step(np.ones(8))
    assert np.all(ps.flat == -0.5)
    with pytest.raises(ValueError, match="shape"):
        opt.step(np.ones(7))


def test_many_groups_of_paramsets():
    enc = fo.ParamSet({"w": np.ones(3)})
    dec = fo.ParamSet({"w": np.ones(2)})
    opt = fo.SGD([{"params": enc}, {"params": dec, "lr": 1.0}], lr=0.1)
    enc.grad_flat[...] = 1
    dec.grad_flat[...] = 1
    opt.step()
    np.testing.assert_allclose(enc.flat, 0.9)
    np.testing.assert_allclose(dec.flat, 0.0)
