"""GradientAccumulator: a parameter without a gradient in a cycle is skipped; a refused flush
keeps the sum, so that a retry steps once on it."""

import ml_dtypes
import numpy as np
import pytest

import fastopt as fo

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_parameter_without_gradient_in_a_later_cycle_is_skipped(dtype):
    """Its zeroed buffer from the cycle before is not passed as a zero gradient: the step skips
    it as ``optimizer.step`` does (value and step count kept), as torch skips params without
    ``.grad``."""

    def g(n):
        return np.ones(n, dtype)

    a, b = np.ones(3, dtype), np.ones(2, dtype)
    opt = fo.Adam([a, b], lr=0.1)
    acc = fo.GradientAccumulator(opt, 2)
    acc.add([g(3), g(2)])
    acc.add([g(3), g(2)])
    acc.add([g(3), None])
    assert acc.add([g(3), None])

    a_ref, b_ref = np.ones(3, dtype), np.ones(2, dtype)
    ref = fo.Adam([a_ref, b_ref], lr=0.1)
    ref.step([g(3), g(2)])
    ref.step([g(3), None])
    assert opt.state[0]["step"] == ref.state[0]["step"] == 2
    assert opt.state[1]["step"] == ref.state[1]["step"] == 1
    np.testing.assert_array_equal(a.view(np.uint8), a_ref.view(np.uint8))
    np.testing.assert_array_equal(b.view(np.uint8), b_ref.view(np.uint8))

    # a gradient in a later cycle steps it again, on that cycle's sum alone
    acc.add([g(3), None])
    assert acc.add([g(3), 2 * g(2)])
    ref.step([g(3), g(2)])
    assert opt.state[1]["step"] == ref.state[1]["step"] == 2
    np.testing.assert_array_equal(b.view(np.uint8), b_ref.view(np.uint8))


def test_16bit_paramset_cycle_without_given_gradients_steps_on_its_buffer():
    """A 16-bit ParamSet given gradients in one cycle and only its own buffer (``add()``) in the
    next steps on that buffer in the next."""
    ps = fo.ParamSet({"w": np.zeros(4, F32)}, dtype="bfloat16")
    opt = fo.SGD(ps, lr=1.0, master_weights=True)
    acc = fo.GradientAccumulator(opt, 2)
    acc.add(np.full(4, 1.0, BF16))
    assert acc.add(np.full(4, 3.0, BF16))
    ps.grads["w"][...] = 0.5
    acc.add()
    ps.grads["w"][...] += 0.5
    assert acc.add()
    np.testing.assert_array_equal(opt.state[0]["master_param"], -2.5)
    assert opt.state[0]["step"] == 2
    assert not ps.grad_flat.astype(F32).any()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("via", ["add", "flush"])
def test_refused_flush_keeps_the_sum_for_a_retry(dtype, via):
    """The step refusing (an invalid lr) inside ``flush()`` writes nothing; the 16-bit
    ParamSet's buffer, already added into the float32 sum, is not added a second time by the
    retry: it steps on the mean of the two micro-batches, as a first flush would."""
    ps = fo.ParamSet({"w": np.zeros(4, F32)}, dtype=dtype)
    opt = fo.SGD(ps, lr=1.0)
    acc = fo.GradientAccumulator(opt, 2 if via == "add" else 3)
    acc.add(np.ones(4, dtype))
    ps.grads["w"][...] += 1.0  # the second micro-batch, accumulated by the caller
    opt.param_groups[0]["lr"] = -1.0
    if via == "flush":
        acc.add()
    with pytest.raises(ValueError, match="lr"):
        (acc.add if via == "add" else acc.flush)()
    assert not np.asarray(ps["w"], F32).any() and not opt.state and acc.count == 2
    opt.param_groups[0]["lr"] = 1.0
    acc.flush()
    np.testing.assert_array_equal(np.asarray(ps["w"], F32), -1.0)
    assert opt.state[0]["step"] == 1 and acc.count == 0
    assert not ps.grad_flat.astype(F32).any()


def test_gradient_added_after_a_refused_flush_counts_once():
    """What the caller adds to the 16-bit ParamSet buffer between a refused flush and the retry
    joins the sum once, like what was there before."""
    ps = fo.ParamSet({"w": np.zeros(4, F32)}, dtype="bfloat16")
    opt = fo.SGD(ps, lr=1.0, master_weights=True)
    acc = fo.GradientAccumulator(opt, 4)
    acc.add(np.full(4, 1.0, BF16))
    ps.grads["w"][...] += 2.0
    acc.add()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        acc.flush()
    opt.param_groups[0]["lr"] = 1.0
    ps.grads["w"][...] += 5.0
    acc.add()
    acc.flush()
    np.testing.assert_array_equal(
        opt.state[0]["master_param"], -(np.float32(8.0) * np.float32(1 / 3))
    )
