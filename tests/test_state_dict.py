"""state_dict / load_state_dict: plain dicts, exact resume, and clear refusals."""

import copy

import numpy as np
import pytest
from optimizer_cases import CASES, grad_of

import fastopt as fo


def _params(seed=3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((5, 4)), rng.standard_normal(6)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_resume_is_bit_identical(case):
    _, cls, kwargs = case
    straight = _params()
    opt = cls(straight, **kwargs)
    for t in range(20):
        opt.step(grad_of(straight, t))

    first = _params()
    opt1 = cls(first, **kwargs)
    for t in range(10):
        opt1.step(grad_of(first, t))
    saved = copy.deepcopy(opt1.state_dict())
    resumed = [p.copy() for p in first]
    opt2 = cls(resumed, **kwargs)
    opt2.load_state_dict(saved)
    for t in range(10, 20):
        opt2.step(grad_of(resumed, t))
    for a, b in zip(straight, resumed):
        assert np.array_equal(a, b)


def test_state_dict_is_plain_numpy_and_python():
    w = np.zeros((2, 3), np.float32)
    opt = fo.NAdam([w], lr=0.01)
    opt.step([np.ones_like(w)])
    sd = opt.state_dict()
    assert sd["algorithm"] == "NAdam"
    entry = sd["state"][0]
    assert entry["step"] == 1 and isinstance(entry["step"], int)
    assert isinstance(entry["mu_product"], float)
    assert entry["exp_avg"].shape == (2, 3) and entry["exp_avg"].dtype == np.float32
    entry["exp_avg"][...] = 123  # a snapshot, not a view of the live state
    assert not np.any(opt.state[0]["exp_avg"] == 123)
    assert sd["param_groups"][0]["params"] == [0]


def test_paramset_state_dict_round_trip():
    ps = fo.ParamSet({"w": np.ones((3, 3)), "b": np.ones(3)})
    opt = fo.Adam(ps, lr=0.1)
    ps.grads["w"][...] = 1
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].shape == (12,)
    ps2 = fo.ParamSet({"w": np.ones((3, 3)), "b": np.ones(3)})
    opt2 = fo.Adam(ps2, lr=0.1)
    opt2.load_state_dict(sd)
    assert np.array_equal(opt2.state[0]["exp_avg"], opt.state[0]["exp_avg"])


def test_load_refuses_other_algorithm_and_shapes_and_changes_nothing():
    w = np.zeros(4)
    adam = fo.Adam([w], lr=0.1)
    adam.step([np.ones(4)])
    sgd = fo.SGD([np.zeros(4)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="for Adam, this optimizer is SGD"):
        sgd.load_state_dict(adam.state_dict())

    other = fo.Adam([np.zeros(5)], lr=0.1)
    before = other.state_dict()
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(adam.state_dict())
    assert other.state_dict()["state"] == before["state"] == {}

    two = fo.Adam([np.zeros(4), np.zeros(4)], lr=0.1)
    with pytest.raises(ValueError, match="parameters"):
        two.load_state_dict(adam.state_dict())

    sd = adam.state_dict()
    del sd["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match="needs"):
        fo.Adam([np.zeros(4)], lr=0.1).load_state_dict(sd)

    sd = adam.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    target = fo.Adam([np.zeros(4)], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        target.load_state_dict(sd)
    assert target.param_groups[0]["lr"] == 0.1

    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        target.load_state_dict({"foo": 1})


def test_param_groups_are_editable_between_steps():
    w = np.zeros(3)
    opt = fo.SGD([w], lr=0.1)
    opt.step([np.ones(3)])
    opt.param_groups[0]["lr"] = 0.5
    opt.step([np.ones(3)])
    np.testing.assert_allclose(w, -0.6)


def test_callable_lr_sees_the_step_count():
    w = np.zeros(1)
    seen = []
    opt = fo.SGD([w], lr=lambda k: seen.append(k) or 0.1)
    for _ in range(3):
        opt.step([np.ones(1)])
    assert seen == [0, 1, 2]
    np.testing.assert_allclose(w, -0.3)


def test_none_gradient_skips_that_parameter_like_torch():
    a, b = np.zeros(2), np.zeros(2)
    opt = fo.Adam([a, b], lr=0.1)
    opt.step([np.ones(2), None])
    assert np.all(b == 0) and np.all(a != 0)
    assert list(opt.state) == [0]
