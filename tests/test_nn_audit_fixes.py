"""Audit fixes of fastopt.nn, the Trainer and GradientAccumulator over an MLP: integer and
float16 / byte-swapped features, accumulation over ``model.params``, label smoothing of
probability targets, the float32 cross-entropy value, argument checks before any write, and the
weights restored after a divergence."""

import types

import numpy as np
import pytest
from oracle import torch_or_skip

import fastopt as fo
from fastopt.nn import LOSSES, MLP
from fastopt.nn.losses import batch_loss
from fastopt.nn.ops import ArrayOps, NumbaOps
from fastopt.trainer import Trainer

BACKENDS = ["numba", "array"]


# ------------------------------------------------------------------ integer features


def test_integer_features_are_standardized_in_float64_not_cast_to_float32_first():
    # unix timestamps 3 s apart: float32 (24 significant bits) rounds them to one value
    X_int = (1_700_000_000 + np.arange(8) * 3).reshape(-1, 1).astype(np.int64)
    X_f64 = X_int.astype(np.float64)
    out = {}
    for X in (X_int, X_f64):
        m = MLP(1, (4,), 2, seed=0)  # a float32 model
        assert m.check_X(X).dtype == np.float64
        m.fit_standardizer(X)
        out[X.dtype.kind] = (m.buffers["input.inv_std"].copy(), m.logits(X))
    np.testing.assert_array_equal(out["i"][0], out["f"][0])
    assert out["i"][0][0] == pytest.approx(1 / X_f64.std())
    np.testing.assert_array_equal(out["i"][1], out["f"][1])
    assert np.unique(out["i"][1][:, 0]).size == 8  # the rows stay distinct


def test_bool_and_small_int_features_give_the_float_results():
    rng = np.random.default_rng(0)
    Xb = rng.random((6, 3)) < 0.5
    y = rng.integers(0, 2, 6)
    a, b = MLP(3, (4,), 2, seed=0), MLP(3, (4,), 2, seed=0)
    for X in (Xb, Xb.astype(np.int8)):
        assert a.loss_and_grad(X, y) == b.loss_and_grad(Xb.astype(np.float64), y)
        np.testing.assert_array_equal(a.params.grad_flat, b.params.grad_flat)


# ------------------------------------------------------------------ float16, byte order


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_and_byte_swapped_features_are_converted_for_the_kernels(backend):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 3))
    y = rng.integers(0, 2, 6)
    cases = [
        (X.astype(np.float16), X.astype(np.float16).astype(np.float32)),  # exact in float32
        (X.astype(">f8"), X),
        (X.astype(np.float32).astype(">f4"), X.astype(np.float32)),
    ]
    for Xi, same in cases:
        m = MLP(3, (4,), 2, seed=0, backend=backend)
        ref = MLP(3, (4,), 2, seed=0, backend=backend)
        assert m.check_X(Xi).dtype.isnative
        assert m.loss_and_grad(Xi, y) == ref.loss_and_grad(same, y)
        np.testing.assert_array_equal(m.params.grad_flat, ref.params.grad_flat)
        np.testing.assert_array_equal(m.predict(Xi), ref.predict(same))


def test_trainer_fits_float16_features_and_byte_swapped_targets():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3))
    y = rng.standard_normal(20)
    runs = []
    for Xi, yi in ((X.astype(np.float16), y.astype(">f8")), (X.astype(np.float16), y)):
        m = MLP(3, (4,), 1, loss="mse", seed=0)
        Trainer(m, epochs=2, batch_size=8, seed=0, progress=False).fit(Xi, yi)
        runs.append(m.params.flat.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_nonfinite_float16_features_are_still_refused():
    m = MLP(2, (3,), 2, seed=0)
    X = np.array([[1.0, np.inf]], np.float16)
    with pytest.raises(ValueError, match="NaN or infinity"):
        m.check_X(X)


# ------------------------------------------------------------------ accumulation over an MLP


def _micro_batches(X, y, k):
    n = len(y) // k
    return [(X[j * n : (j + 1) * n], y[j * n : (j + 1) * n]) for j in range(k)]


@pytest.mark.parametrize("how", ["add()", "add(copy)", "add(buffer)", "add(grads_for)"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulator_over_model_params_steps_on_the_mean_gradient(how, k):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 3)), rng.integers(0, 3, 16)
    ref = MLP(3, (5, 4), 3, seed=0, dtype="float64")
    opt_ref = fo.SGD(ref.params, lr=0.7, momentum=0.9)
    m = MLP(3, (5, 4), 3, seed=0, dtype="float64")
    opt = fo.SGD(m.params, lr=0.7, momentum=0.9)
    acc = fo.GradientAccumulator(opt, k)
    for _ in range(3):  # three real steps: the sums are reset between cycles
        ref.loss_and_grad(X, y)
        opt_ref.step()
        took = []
        for Xb, yb in _micro_batches(X, y, k):
            m.loss_and_grad(Xb, yb)
            if how == "add()":
                took.append(acc.add())
            elif how == "add(copy)":
                took.append(acc.add(m.params.grad_flat.copy()))
            elif how == "add(buffer)":
                took.append(acc.add(m.params.grad_flat))
            else:
                took.append(acc.add(m.grads_for(opt)))
        assert took == [False] * (k - 1) + [True]
        np.testing.assert_allclose(m.params.flat, ref.params.flat, rtol=0, atol=1e-15)
    assert not m.params.grad_flat.any()  # zeroed after the step, as for any ParamSet


def test_accumulator_over_weight_decay_groups_of_an_mlp():
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((12, 3)), rng.integers(0, 2, 12)
    ref, m = (MLP(3, (4,), 2, seed=0, dtype="float64") for _ in range(2))
    opt_ref = fo.SGD(ref.param_groups(weight_decay=0.1), lr=0.5)
    opt = fo.SGD(m.param_groups(weight_decay=0.1), lr=0.5)
    acc = fo.GradientAccumulator(opt, 3)
    ref.loss_and_grad(X, y)
    opt_ref.step(ref.grads_for(opt_ref))
    for Xb, yb in _micro_batches(X, y, 3):
        m.loss_and_grad(Xb, yb)
        acc.add(m.grads_for(opt))
    np.testing.assert_allclose(m.params.flat, ref.params.flat, rtol=0, atol=1e-15)


def test_accumulated_mlp_micro_batches_match_torch():
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((12, 3)), rng.integers(0, 3, 12)
    m = MLP(3, (5,), 3, seed=0, dtype="float64")
    m.params.flat[...] += rng.normal(0, 0.1, m.params.size)  # nonzero biases
    tp = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in m.params.items()}
    opt = fo.SGD(m.params, lr=0.3)
    topt = torch.optim.SGD(list(tp.values()), lr=0.3)
    acc = fo.GradientAccumulator(opt, 3)
    topt.zero_grad()
    for Xb, yb in _micro_batches(X, y, 3):
        m.loss_and_grad(Xb, yb)
        acc.add()
        h = torch.relu(torch.tensor(Xb) @ tp["layers.0.weight"] + tp["layers.0.bias"])
        z = h @ tp["layers.1.weight"] + tp["layers.1.bias"]
        (torch.nn.functional.cross_entropy(z, torch.tensor(yb)) / 3).backward()
    topt.step()
    for name, v in tp.items():
        np.testing.assert_allclose(m.params[name], v.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_plain_paramset_keeps_its_sum_in_its_gradient_buffer():
    """The normal case costs nothing more: no buffer of the accumulator's own, no pass."""
    ps = fo.ParamSet({"w": np.zeros(3)})
    acc = fo.GradientAccumulator(fo.SGD(ps, lr=1.0), 2)
    ps.grads["w"][...] += 1.0
    acc.add()
    ps.grads["w"][...] += 3.0
    acc.add()
    np.testing.assert_array_equal(ps["w"], -2.0)
    assert acc._sums == {}


def test_paramset_group_given_none_in_add_grads_is_not_added_twice():
    """None for a ParamSet in add(grads) means its own buffer, already the sum (as add())."""
    a, b = fo.ParamSet({"w": np.zeros(2)}), fo.ParamSet({"v": np.zeros(3)})
    opt = fo.SGD([{"params": a}, {"params": b}], lr=1.0)
    acc = fo.GradientAccumulator(opt, 2)
    a.grads["w"][...] += 1.0
    acc.add([None, np.full(3, 3.0)])
    a.grads["w"][...] += 1.0
    acc.add([None, np.full(3, 5.0)])
    np.testing.assert_array_equal(a["w"], -1.0)
    np.testing.assert_array_equal(b["v"], -4.0)


# ------------------------------------------------------------------ label smoothing, soft targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_label_smoothing_applies_to_probability_targets_as_torch(dtype, backend):
    torch = torch_or_skip()
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    n, k, eps = 7, 4, 0.2
    z = (rng.standard_normal((n, k)) * 3).astype(dtype)
    t = rng.dirichlet(np.ones(k), n)
    t[0] = np.eye(k)[2]  # one-hot
    t[1] *= 0.7  # not summing to 1: torch smooths it all the same
    t = t.astype(dtype)
    ops = NumbaOps(parallel=False) if backend == "numba" else ArrayOps(np)
    ws = _ws(n, T=t)
    D = np.empty_like(z)
    total, correct, _ = batch_loss(
        LOSSES["cross_entropy"], ops, z, D, ws, labels=False, label_smoothing=eps
    )
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    ref = F.cross_entropy(zt, torch.tensor(t, dtype=torch.float64), label_smoothing=eps)
    ref.backward()
    rtol = 1e-13 if dtype == "float64" else 2e-6
    assert total / n == pytest.approx(ref.item(), rel=rtol)
    np.testing.assert_allclose(D, zt.grad.numpy(), rtol=rtol, atol=rtol * 0.1)
    assert correct == int((z.argmax(1) == t.argmax(1)).sum())


def _ws(n, labels=None, T=None):
    return types.SimpleNamespace(
        labels=labels,
        T=T,
        row_loss=np.empty(n),
        row_correct=np.empty(n, np.int64),
        row_abs=np.empty(n),
        row_sq=np.empty(n),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_targets_and_labels_give_the_same_smoothed_loss(backend):
    rng = np.random.default_rng(0)
    X, labels = rng.standard_normal((5, 3)), rng.integers(0, 4, 5)
    m = MLP(3, (6,), 4, label_smoothing=0.2, dtype="float64", seed=0, backend=backend)
    la = m.loss_and_grad(X, labels, train=False)
    ga = m.params.grad_flat.copy()
    lb = m.loss_and_grad(X, np.eye(4)[labels], train=False)
    assert la == pytest.approx(lb, rel=1e-14)
    np.testing.assert_allclose(ga, m.params.grad_flat, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ float32 cross-entropy value


def _confident_logits(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    Z = np.zeros((n, 3), np.float32)
    Z[:, 0] = 100 + rng.random(n).astype(np.float32) * 20  # large logits
    Z[:, 1] = Z[:, 0] - 9 - rng.random(n).astype(np.float32) * 3  # a margin of 9..12
    Z[:, 2] = Z[:, 0] - 30
    return Z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("targets", ["labels", "one-hot", "smoothed labels"])
def test_float32_cross_entropy_value_has_no_cancellation(targets, backend):
    """Loss ~4e-5 per row at logits ~100: computed as lse - z_label with lse rounded to
    float32 it was off by 1.7e-3 relative (torch float32: 2e-5)."""
    torch = torch_or_skip()
    F = torch.nn.functional
    Z = _confident_logits()
    n = len(Z)
    y = np.zeros(n, np.int64)
    eps = 0.1 if targets == "smoothed labels" else 0.0
    ops = NumbaOps(parallel=False) if backend == "numba" else ArrayOps(np)
    if targets == "one-hot":
        ws, labels, tgt = _ws(n, T=np.eye(3, dtype=np.float32)[y]), False, torch.tensor(y)
    else:
        ws, labels, tgt = _ws(n, labels=y), True, torch.tensor(y)
    total, _, _ = batch_loss(
        LOSSES["cross_entropy"], ops, Z, np.empty_like(Z), ws, labels=labels, label_smoothing=eps
    )
    exact = F.cross_entropy(torch.tensor(Z, dtype=torch.float64), tgt, label_smoothing=eps).item()
    assert abs(total / n - exact) / exact < 1e-4


def test_float32_model_reports_the_accurate_loss():
    Z = _confident_logits()
    y = np.zeros(len(Z), np.int64)
    exact = None
    for backend in BACKENDS:
        m = MLP(3, (), 3, seed=0, backend=backend)  # identity network: logits == X
        m.params["layers.0.weight"][...] = np.eye(3)
        m.params["layers.0.bias"][...] = 0
        loss = m.compute_loss(Z, y)
        if exact is None:
            z64 = Z.astype(np.float64)
            mx = z64.max(1)
            exact = np.mean(mx - z64[:, 0] + np.log(np.exp(z64 - mx[:, None]).sum(1)))
        assert abs(loss - exact) / exact < 1e-4


# ------------------------------------------------------------------ checks before any write


def test_compute_loss_in_training_mode_refuses_a_single_row_with_batch_norm():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((1, 3)), np.array([1])
    m = MLP(3, (4,), 2, batch_norm=True, seed=0, dtype="float64")
    before = {k: v.copy() for k, v in m.buffers.items()}
    for call in (m.compute_loss, m.loss_and_grad):
        with pytest.raises(ValueError, match="more than 1 sample"):
            call(X, y, train=True)
    for k, v in before.items():
        np.testing.assert_array_equal(m.buffers[k], v)
    assert np.isfinite(m.compute_loss(X, y))  # evaluation mode is fine on one row


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (0, ValueError), (2.0, TypeError)])
def test_logits_predict_evaluate_check_batch_size(bad, error):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    m = MLP(3, (4,), 2, seed=0, dtype="float64")
    for call in (
        lambda: m.logits(X, batch_size=bad),
        lambda: m.predict(X, batch_size=bad),
        lambda: m.evaluate(X, y, batch_size=bad),
        lambda: m.evaluate_checked(m.check_X(X), m.check_targets(y), batch_size=bad),
    ):
        with pytest.raises(error, match="batch_size"):
            call()
    np.testing.assert_allclose(m.logits(X, batch_size=2), m.logits(X), rtol=1e-14)


def test_trainer_refuses_weight_decay_with_an_optimizer_instance():
    m = MLP(4, (8,), 2, seed=0, dtype="float64")
    opt = fo.SGD(m.params, lr=0.1)
    with pytest.raises(ValueError, match="weight_decay with a SGD instance: pass the class"):
        Trainer(m, opt, weight_decay=0.5, max_grad_norm=1.0, progress=False)
    assert opt.max_grad_norm is None  # nothing set on the instance
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0]
    Trainer(m, opt, max_grad_norm=1.0, progress=False)  # without weight_decay: fine


def test_trainer_refuses_batch_size_1_with_batch_norm_up_front():
    m = MLP(3, (4,), 2, batch_norm=True, seed=0)
    opt = fo.SGD(m.params, lr=0.1)
    with pytest.raises(ValueError, match="at least 2 samples per batch") as info:
        Trainer(m, opt, batch_size=1, max_grad_norm=1.0, progress=False)
    assert "drop_last" not in str(info.value)
    assert opt.max_grad_norm is None
    Trainer(m, opt, batch_size=2, progress=False)
    Trainer(MLP(3, (4,), 2, seed=0), batch_size=1, progress=False)  # no batch norm: fine


# ------------------------------------------------------------------ divergence


def test_divergence_restores_finite_weights_when_the_last_step_overflowed_them():
    """The step after the last finite loss can overflow the weights (its loss is computed
    before it): the epoch-start state of the next epoch is not finite, the one before is."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.standard_normal(16) * 1e3
    m = MLP(3, (4,), 1, loss="mse", seed=0)
    w_init = m.params.flat.copy()
    t = Trainer(m, fo.SGD, lr=1e38, batch_size=16, epochs=3, seed=0, progress=False)
    h = t.fit(X, y)
    assert h.stop_reason == "nonfinite_loss" and h.stop_epoch == 2
    assert np.isfinite(h["loss"][0]) and not np.isfinite(h["loss"][1])
    np.testing.assert_array_equal(m.params.flat, w_init)  # epoch 1's start: the last finite
    assert np.isfinite(m.predict(X)).all()


def test_divergence_still_restores_the_diverging_epochs_start_when_it_is_finite():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 3))
    y = rng.standard_normal(32)
    m = MLP(3, (4,), 1, loss="mse", seed=0, dtype="float64")

    states = []

    def keep(trainer, epoch, logs):
        states.append(trainer.model.params.flat.copy())

    t = Trainer(m, fo.SGD, lr=1e-3, batch_size=16, epochs=2, seed=0, progress=False)
    t.callbacks.append(keep)
    t.fit(X, y)
    # a lr that makes the next epoch's loss overflow on its second step
    for g in t.optimizer.param_groups:
        g["lr"] = 1e300
    h = t.fit(X, y, epochs=4)
    assert h.stop_reason == "nonfinite_loss" and h.stop_epoch == 3
    np.testing.assert_array_equal(m.params.flat, states[-1])  # the start of epoch 3
