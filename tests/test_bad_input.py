"""Every bad input raises a clear error before anything is written: params and state unchanged."""

import numpy as np
import pytest

import fastopt as fo


def _setup(cls=fo.Adam, **kw):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    opt = cls([w, b], lr=1e-2, **kw)
    opt.step([np.ones_like(w), np.ones_like(b)])  # state exists
    return w, b, opt


def _snapshot(params, opt):
    return [p.copy() for p in params], opt.state_dict()


def _assert_unchanged(params, opt, snap):
    ps, sd = snap
    for a, b in zip(params, ps):
        assert np.array_equal(a, b)
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert np.array_equal(now["state"][i][k], v), k


BAD_GRADS = {
    "wrong shape": (
        lambda w, b: [np.ones((3, 4), np.float32), np.ones_like(b)],
        ValueError,
        "shape",
    ),
    "wrong dtype": (
        lambda w, b: [np.ones(w.shape, np.complex64), np.ones_like(b)],
        TypeError,
        "dtype",
    ),
    "integer dtype": (
        lambda w, b: [np.ones(w.shape, np.int32), np.ones_like(b)],
        TypeError,
        "dtype",
    ),
    "non-contiguous": (
        lambda w, b: [np.ones((3, 4), np.float32).T, np.ones_like(b)],
        ValueError,
        "contiguous",
    ),
    "too few": (lambda w, b: [np.ones_like(w)], ValueError, "2 gradients"),
    "not an array": (
        lambda w, b: [[1.0] * 12, np.ones_like(b)],
        TypeError,
        "unsupported array type",
    ),
    "second bad only": (
        lambda w, b: [np.ones_like(w), np.ones(4, np.float32)],
        ValueError,
        "shape",
    ),
}


@pytest.mark.parametrize("name", list(BAD_GRADS))
def test_bad_gradients_raise_and_change_nothing(name):
    make, exc, match = BAD_GRADS[name]
    w, b, opt = _setup()
    snap = _snapshot([w, b], opt)
    with pytest.raises(exc, match=match):
        opt.step(make(w, b))
    _assert_unchanged([w, b], opt, snap)


def test_read_only_param_raises_before_any_write():
    w, b, opt = _setup()
    snap = _snapshot([w, b], opt)
    b.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.step([np.ones_like(w), np.ones_like(b)])
    b.flags.writeable = True
    _assert_unchanged([w, b], opt, snap)


def test_read_only_paramset_buffer_raises():
    ps = fo.ParamSet({"w": np.zeros(5, np.float32)})
    opt = fo.SGD(ps, lr=0.1)
    ps.flat.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.step()


def test_second_group_error_leaves_first_group_untouched():
    w, b = np.ones(4, np.float32), np.ones(3, np.float32)
    opt = fo.SGD([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        opt.step([[np.ones(4, np.float32)], [np.ones(5, np.float32)]])
    assert np.all(w == 1) and np.all(b == 1)


def test_hyperparameter_edit_to_bad_value_is_caught_before_writing():
    w, b, opt = _setup()
    snap = _snapshot([w, b], opt)
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step([np.ones_like(w), np.ones_like(b)])
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    _assert_unchanged([w, b], opt, snap)


def test_schedule_returning_bad_lr_raises_before_writing():
    w = np.ones(3)
    opt = fo.SGD([w], lr=lambda k: float("nan"))
    with pytest.raises(ValueError, match="schedule returned"):
        opt.step([np.ones(3)])
    assert np.all(w == 1)


BAD_HYPER = [
    (fo.SGD, dict(lr=-0.1), "lr"),
    (fo.SGD, dict(lr=float("nan")), "lr"),
    (fo.SGD, dict(lr="fast"), "lr"),
    (fo.SGD, dict(momentum=-0.5), "momentum"),
    (fo.SGD, dict(nesterov=True), "nesterov"),
    (fo.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    (fo.SGD, dict(weight_decay=-1e-4), "weight_decay"),
    (fo.SGD, dict(dampening=1.5), "dampening"),
    (fo.Adam, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (fo.Adam, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (fo.Adam, dict(betas=(0.9,)), "betas"),
    (fo.Adam, dict(eps=-1e-8), "eps"),
    (fo.Adam, dict(amsgrad=1), "amsgrad"),
    (fo.AdamW, dict(weight_decay=-0.01), "weight_decay"),
    (fo.Adagrad, dict(lr_decay=-1.0), "lr_decay"),
    (fo.Adagrad, dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (fo.RMSprop, dict(alpha=1.5), "alpha"),
    (fo.RMSprop, dict(centered="yes"), "centered"),
    (fo.Adadelta, dict(rho=-0.1), "rho"),
    (fo.NAdam, dict(momentum_decay=-1.0), "momentum_decay"),
    (fo.Rprop, dict(etas=(1.5, 1.2)), "etas"),
    (fo.Rprop, dict(step_sizes=(1.0, 0.1)), "step_sizes"),
    (fo.Yogi, dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (fo.Lion, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
]


@pytest.mark.parametrize(
    "cls,kwargs,match", BAD_HYPER, ids=[f"{c.__name__}-{m}" for c, _, m in BAD_HYPER]
)
def test_out_of_range_hyperparameters_raise_naming_the_parameter(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls([np.zeros(3, np.float32)], **kwargs)


def test_bad_params_at_construction():
    with pytest.raises(TypeError, match="dtype"):
        fo.SGD([np.zeros(3, np.int64)], lr=0.1)
    with pytest.raises(ValueError, match="contiguous"):
        fo.SGD([np.zeros((3, 4)).T], lr=0.1)
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fo.SGD([ro], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        fo.SGD([], lr=0.1)
    w = np.zeros(3)
    with pytest.raises(ValueError, match="one group only"):
        fo.SGD([{"params": [w]}, {"params": [w]}], lr=0.1)
    with pytest.raises(ValueError, match="one group only"):
        fo.SGD([w, w], lr=0.1)
    buf = np.zeros(10)
    with pytest.raises(ValueError, match="one group only"):  # overlapping views
        fo.SGD([{"params": [buf[:6]]}, {"params": [buf[4:]]}], lr=0.1)
    fo.SGD([{"params": [buf[:5]]}, {"params": [buf[5:]], "weight_decay": 0.0}], lr=0.1)  # disjoint
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        fo.SGD([{"params": [w], "betas": (0.9, 0.9)}], lr=0.1)
    with pytest.raises(ValueError, match="unknown backend"):
        fo.SGD([w], lr=0.1, backend="tpu")
    with pytest.raises(TypeError, match="ParamSet, an array"):
        fo.SGD(42, lr=0.1)


def test_step_without_grads_needs_a_paramset():
    opt = fo.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="ParamSet"):
        opt.step()


def test_dict_grads_keys_must_match():
    params = {"w": np.zeros(3), "b": np.zeros(2)}
    opt = fo.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        opt.step({"w": np.ones(3)})
    with pytest.raises(TypeError, match="dict"):
        opt.step([np.ones(3), np.ones(2)])


def test_replacing_group_params_is_refused():
    opt = fo.SGD([np.zeros(3)], lr=0.1)
    opt.param_groups[0]["params"] = [np.zeros(3)]
    with pytest.raises(ValueError, match="add_param_group"):
        opt.step([np.ones(3)])


def test_switching_to_a_variant_with_more_state_is_refused():
    w = np.zeros(3)
    opt = fo.Adam([w], lr=0.1)
    opt.step([np.ones(3)])
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt.step([np.ones(3)])


def test_paramset_construction_errors():
    with pytest.raises(ValueError, match="at least one"):
        fo.ParamSet({})
    with pytest.raises(TypeError, match="float"):
        fo.ParamSet({"i": np.zeros(3, np.int32)})
    with pytest.raises(TypeError, match="dtype"):
        fo.ParamSet({"a": np.zeros(3, np.float32), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="unique"):
        fo.ParamSet([("a", np.zeros(2)), ("a", np.zeros(2))])
    with pytest.raises(TypeError, match="names"):
        fo.ParamSet({1: np.zeros(2)})
    with pytest.raises(ValueError, match="device"):
        fo.ParamSet({"a": np.zeros(2)}, device="tpu")


def test_scalars_with_wrong_field_names_fail_before_any_write():
    """_scalars returns its fields by name; the base class orders them by the declaration in
    kernels/rules.py and names what is missing or unexpected."""

    class Broken(fo.Adam):
        def _scalars(self, group, state, step, lr):
            h, updates = super()._scalars(group, state, step, lr)
            h["stepsize"] = h.pop("step_size")
            return h, updates

    w, b = np.ones(3, np.float32), np.ones(2, np.float32)
    opt = Broken([w, b], lr=0.1)
    with pytest.raises(TypeError, match=r"missing \['step_size'\], unexpected \['stepsize'\]"):
        opt.step([np.ones_like(w), np.ones_like(b)])
    assert np.array_equal(w, np.ones(3)) and np.array_equal(b, np.ones(2))
