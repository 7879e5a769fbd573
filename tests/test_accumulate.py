"""k micro-batches through GradientAccumulator == one step on the concatenated batch."""

import numpy as np
import pytest

import fastopt as fo


def _mse_grad(w, b, X, y):
    r = X @ w + b - y
    return [X.T @ r * (2 / len(y)), np.array([2 * r.mean()])]


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (fo.Adam, dict(lr=0.05, weight_decay=0.1, max_grad_norm=0.5)),
        (fo.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
        (fo.AdamW, dict(lr=0.05, skip_nonfinite=True)),
    ],
)
@pytest.mark.parametrize("layout", ["arrays", "paramset"])
def test_accumulated_microbatches_equal_one_big_batch(cls, kwargs, layout):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 5)), rng.standard_normal(64)
    k = 4
    w_big, b_big = np.zeros(5), np.zeros(1)
    opt_big = cls([w_big, b_big], **kwargs)
    if layout == "paramset":
        ps = fo.ParamSet({"w": np.zeros(5), "b": np.zeros(1)})
        opt = cls(ps, **kwargs)
        w, b = ps["w"], ps["b"]
    else:
        w, b = np.zeros(5), np.zeros(1)
        opt = cls([w, b], **kwargs)
    acc = fo.GradientAccumulator(opt, k)
    for _ in range(10):
        opt_big.step(_mse_grad(w_big, b_big, X, y))
        took = []
        for j in range(k):
            sl = slice(j * 16, (j + 1) * 16)
            gw, gb = _mse_grad(w, b, X[sl], y[sl])
            took.append(acc.add(_as(layout, gw, gb)))
        assert took == [False] * (k - 1) + [True]
    np.testing.assert_allclose(w, w_big, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b, b_big, rtol=1e-12, atol=1e-14)
    assert opt.state_dict()["state"][0]["step"] == 10


def _as(layout, gw, gb):
    return np.concatenate([gw, gb]) if layout == "paramset" else [gw, gb]


def test_accumulating_into_the_paramset_buffer_directly():
    ps = fo.ParamSet({"w": np.zeros(3)})
    opt = fo.SGD(ps, lr=1.0)
    acc = fo.GradientAccumulator(opt, 2)
    ps.grads["w"][...] += 1.0
    assert acc.add() is False
    ps.grads["w"][...] += 3.0
    assert acc.add() is True
    np.testing.assert_array_equal(ps["w"], -2.0)
    assert not ps.grad_flat.any()


def test_bad_micro_batch_is_refused_before_adding():
    w = np.zeros(3)
    acc = fo.GradientAccumulator(fo.SGD([w], lr=1.0), 2)
    acc.add([np.ones(3)])
    with pytest.raises(ValueError, match="shape"):
        acc.add([np.ones(4)])
    assert acc.add([np.ones(3)]) is True
    np.testing.assert_array_equal(w, -1.0)
    with pytest.raises(ValueError, match="ParamSet"):
        acc.add()
    with pytest.raises(ValueError, match="steps"):
        fo.GradientAccumulator(fo.SGD([w], lr=1.0), 0)


def test_flush_steps_on_a_partial_window():
    w = np.zeros(2)
    acc = fo.GradientAccumulator(fo.SGD([w], lr=1.0), 4)
    acc.add([np.full(2, 2.0)])
    acc.add([np.full(2, 4.0)])
    acc.flush()
    np.testing.assert_array_equal(w, -3.0)


def test_optimizer_accessors_check_and_rebuild_gradient_structures():
    """Optimizer.check_grads validates like step() and writes nothing; structure_grads puts one
    array per unit back into the structure step() takes (what GradientAccumulator uses)."""
    w, b = np.ones((3, 2)), np.ones(2)
    ps = fo.ParamSet({"v": np.ones(4)})
    opt = fo.SGD([{"params": {"w": w, "b": b}}, {"params": ps}], lr=0.1)
    units = opt.units()
    assert [u.shape for u in units] == [(3, 2), (2,), (4,)]
    gw, gb = np.full((3, 2), 2.0), np.full(2, 3.0)
    work = opt.check_grads([{"w": gw, "b": gb}, None])
    assert [u for u, _ in work] == units
    assert [g.shape for _, g in work] == [(6,), (2,), (4,)]
    assert np.shares_memory(work[0][1], gw) and work[2][1] is ps.grad_flat
    with pytest.raises(ValueError, match="shape"):
        opt.check_grads([{"w": gb, "b": gb}, None])
    assert np.array_equal(w, np.ones((3, 2))) and not opt.state  # nothing written
    grads = opt.structure_grads([gw, None, None])
    assert grads[0]["w"] is gw and grads[0]["b"] is None and grads[1] is None
    opt.step(grads)
    assert np.allclose(w, 0.8) and np.array_equal(b, np.ones(2))
