"""Refusals before anything is written: load_state_dict with a bad group step count, and LBFGS
over 16-bit parameters."""

import copy

import numpy as np
import pytest

import fastopt as fo

ml_dtypes = pytest.importorskip("ml_dtypes")


def _two_group_sgd():
    w1, w2 = np.ones(4, np.float32), np.ones(3, np.float32)
    opt = fo.SGD([{"params": [w1]}, {"params": [w2]}], lr=0.1, momentum=0.9, skip_nonfinite=True)
    opt.step([[np.ones(4, np.float32)], [np.ones(3, np.float32)]])
    return opt


def _assert_same(a, b):
    """Deep equality of two state_dicts (arrays compared by value)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("steps", [None, -3, 1.5, True, "2"], ids=repr)
def test_refused_load_of_bad_group_steps_changes_nothing(steps):
    opt = _two_group_sgd()
    sd = copy.deepcopy(opt.state_dict())
    # valid new values ahead of the bad one: none of them may be applied
    sd["param_groups"][0]["lr"] = 0.5
    sd["skipped_steps"] = 7
    sd["state"][0]["momentum_buffer"][:] = 42.0
    sd["param_groups"][1]["steps"] = steps
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['steps'\] must be an int >= 0"):
        opt.load_state_dict(sd)
    _assert_same(opt.state_dict(), before)
    assert [g["steps"] for g in opt._groups] == [1, 1]


def test_load_takes_integer_group_steps_and_defaults_a_missing_one_to_zero():
    w = np.ones(4, np.float32)
    opt = fo.SGD([w], lr=lambda k: 0.1 * (k + 1))
    sd = opt.state_dict()
    sd["param_groups"][0]["steps"] = np.int64(5)
    opt.load_state_dict(sd)
    assert opt.state_dict()["param_groups"][0]["steps"] == 5
    assert type(opt._groups[0]["steps"]) is int
    opt.step([np.ones(4, np.float32)])  # the schedule sees k = 5: lr 0.6
    assert np.allclose(w, 1 - 0.6)
    del sd["param_groups"][0]["steps"]
    opt.load_state_dict(sd)
    assert opt.state_dict()["param_groups"][0]["steps"] == 0


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bfloat16", "float16"])
def test_lbfgs_refuses_16bit_parameters_at_construction(dtype):
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=f"LBFGS takes float32 or float64 parameters, got {name}"):
        fo.LBFGS([np.ones(4, dtype)])
    with pytest.raises(TypeError, match=f"got {name}"):
        fo.LBFGS(fo.ParamSet({"w": np.ones(3, np.float32)}, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lbfgs_still_steps_float32_and_float64(dtype):
    x = np.full(4, 2.0, dtype)
    opt = fo.LBFGS([x], max_iter=5)
    loss = opt.step(lambda: (float(np.sum(x.astype(np.float64) ** 2)), [2 * x]))
    assert loss == pytest.approx(16.0)
    assert x.dtype == dtype
    assert np.all(np.abs(x) < 1e-3)
