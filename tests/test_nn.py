"""fastopt.nn: gradients against finite differences, kernels against the array reference and
torch, initializers, batch norm, dropout, standardization, bad input."""

import math
import pickle
import tracemalloc

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt import nn
from fastopt.nn import MLP
from fastopt.nn.ops import NumbaOps

ACTS = ["relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid", "identity"]


def _data(loss, n=9, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    if loss == "cross_entropy":
        y = rng.integers(0, k, n)
    elif loss in ("kl_div", "soft_ce"):
        y = rng.dirichlet(np.ones(k), n)
        y[0] = np.eye(k)[1]  # a one-hot row: 0·log 0 terms
    elif loss == "bce":
        y = (rng.random((n, k)) < 0.5).astype(float)
        y[0] = 0.3  # probabilities too
    else:
        y = rng.standard_normal((n, k)) * 2
    return X, y


def _model(loss="cross_entropy", *, k=3, perturb=0.2, seed=1, **kw):
    m = MLP(5, (4, 6), k, loss="cross_entropy" if loss == "soft_ce" else loss, dtype="float64",
            seed=seed, **kw)  # fmt: skip
    # random biases / batch-norm affine parameters: no unit sits exactly on a ReLU kink
    m.params.flat[...] += np.random.default_rng(seed + 100).normal(0, perturb, m.params.size)
    return m


def _grad_check(m, X, y, *, train=True, seed=3, h=1e-6):
    """Max relative error of the analytic gradient against central differences (float64).
    Dropout masks are fixed by reseeding the generator for every evaluation."""
    loss = m.loss_and_grad(X, y, train=train, rng=np.random.default_rng(seed))
    g = m.params.grad_flat.copy()
    f = m.params.flat
    num = np.empty_like(f)
    for i in range(f.size):
        old = f[i]
        f[i] = old + h
        lp = m.compute_loss(X, y, train=train, rng=np.random.default_rng(seed))
        f[i] = old - h
        lm = m.compute_loss(X, y, train=train, rng=np.random.default_rng(seed))
        f[i] = old
        num[i] = (lp - lm) / (2 * h)
    assert np.isfinite(loss)
    assert np.abs(g).max() > 0
    return np.abs(num - g).max() / np.abs(g).max()


@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_activations(activation):
    X, y = _data("cross_entropy")
    assert _grad_check(_model(activation=activation), X, y) < 1e-6


@pytest.mark.parametrize(
    "loss", ["cross_entropy", "soft_ce", "kl_div", "bce", "mse", "l1", "huber"]
)
def test_gradcheck_losses(loss):
    X, y = _data(loss)
    kw = {"huber_delta": 1.5} if loss == "huber" else {}
    if loss == "cross_entropy":
        kw["label_smoothing"] = 0.1
    m = _model(loss, activation="tanh", **kw)
    assert _grad_check(m, X, y) < 1e-6


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_gradcheck_batch_norm_train_and_eval(activation):
    X, y = _data("cross_entropy")
    m = _model(activation=activation, batch_norm=True)
    assert _grad_check(m, X, y, train=True) < 1e-6
    m.buffers["layers.0.bn.running_var"][...] = [0.5, 2.0, 1.0, 3.0]
    m.buffers["layers.1.bn.running_mean"][...] = 0.3
    assert _grad_check(m, X, y, train=False) < 1e-6


@pytest.mark.parametrize("activation", ["relu", "elu", "tanh", "sigmoid", "gelu"])
def test_gradcheck_dropout_fixed_mask(activation):
    X, y = _data("mse")
    m = _model("mse", activation=activation, dropout=0.4)
    assert _grad_check(m, X, y) < 1e-6


def test_gradcheck_everything_together():
    X, y = _data("cross_entropy", n=12)
    m = _model(activation="gelu", batch_norm=True, dropout=0.3, label_smoothing=0.2)
    assert _grad_check(m, X, y) < 1e-6


@pytest.mark.parametrize(
    "loss", ["cross_entropy", "soft_ce", "kl_div", "bce", "mse", "l1", "huber"]
)
@pytest.mark.parametrize("activation", ACTS)
def test_numba_kernels_match_array_reference(activation, loss):
    X, y = _data(loss, n=11)
    kw = dict(activation=activation, batch_norm=activation in ("relu", "tanh"), dropout=0.25)
    a = _model(loss, **kw)
    b = _model(loss, backend="array", **kw)
    la = a.loss_and_grad(X, y, rng=np.random.default_rng(5))
    lb = b.loss_and_grad(X, y, rng=np.random.default_rng(5))
    assert la == pytest.approx(lb, rel=1e-12)
    np.testing.assert_allclose(a.params.grad_flat, b.params.grad_flat, rtol=1e-9, atol=1e-13)
    for name in a.buffers:
        np.testing.assert_allclose(a.buffers[name], b.buffers[name], rtol=1e-12)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-10, atol=1e-14)


def test_parallel_kernels_bit_identical_to_serial():
    """float32 only: the prange templates do not depend on the dtype, and compiling every kernel
    twice more in float64 cost about a minute of CI (float64 is checked against the array
    reference above)."""
    dtype = "float32"
    rng = np.random.default_rng(0)
    X = rng.standard_normal((70, 20))
    y = rng.integers(0, 4, 70)
    kw = dict(activation="gelu", batch_norm=True, dropout=0.2, dtype=dtype, seed=0)
    serial = MLP(20, (130, 70), 4, **kw)
    par = MLP(20, (130, 70), 4, **kw)
    par._ops = NumbaOps(parallel_threshold=0)
    for m in (serial, par):
        m.loss_and_grad(X, y, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(serial.params.grad_flat, par.params.grad_flat)
    np.testing.assert_array_equal(serial.predict(X), par.predict(X))


@pytest.mark.oracle
def test_matches_torch():
    from oracle import torch_or_skip

    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 6))
    y = rng.integers(0, 4, 16)
    m = MLP(6, (8, 5), 4, activation="gelu", batch_norm=True, label_smoothing=0.1,
            dtype="float64", seed=0)  # fmt: skip
    m.params.flat[...] += rng.normal(0, 0.1, m.params.size)
    loss = m.loss_and_grad(X, y)

    t = torch.nn.Sequential(
        torch.nn.Linear(6, 8, bias=False), torch.nn.BatchNorm1d(8), torch.nn.GELU(),
        torch.nn.Linear(8, 5, bias=False), torch.nn.BatchNorm1d(5), torch.nn.GELU(),
        torch.nn.Linear(5, 4),
    ).double()  # fmt: skip
    with torch.no_grad():
        t[0].weight.copy_(torch.tensor(m.params["layers.0.weight"].T))
        t[3].weight.copy_(torch.tensor(m.params["layers.1.weight"].T))
        t[6].weight.copy_(torch.tensor(m.params["layers.2.weight"].T))
        t[6].bias.copy_(torch.tensor(m.params["layers.2.bias"]))
        for i, l in ((1, 0), (4, 1)):
            t[i].weight.copy_(torch.tensor(m.params[f"layers.{l}.bn.weight"]))
            t[i].bias.copy_(torch.tensor(m.params[f"layers.{l}.bn.bias"]))
    out = torch.nn.functional.cross_entropy(
        t(torch.tensor(X)), torch.tensor(y), label_smoothing=0.1
    )
    out.backward()
    assert loss == pytest.approx(out.item(), rel=1e-12)
    g = m.params.grads
    np.testing.assert_allclose(g["layers.0.weight"], t[0].weight.grad.numpy().T, rtol=1e-9)
    np.testing.assert_allclose(g["layers.1.bn.weight"], t[4].weight.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(g["layers.2.bias"], t[6].bias.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        m.buffers["layers.0.bn.running_var"], t[1].running_var.numpy(), rtol=1e-12
    )
    t.eval()
    with torch.no_grad():
        ref = torch.softmax(t(torch.tensor(X)), 1).numpy()
    np.testing.assert_allclose(m.predict(X), ref, rtol=1e-10)


# ------------------------------------------------------------------------------ initializers


@pytest.mark.parametrize(
    "name,std",
    [
        ("normal", 0.01),
        ("xavier_normal", math.sqrt(2 / 700)),
        ("glorot_uniform", math.sqrt(6 / 700) / math.sqrt(3)),
        ("kaiming_normal", math.sqrt(2) / math.sqrt(400)),
        ("he_uniform", math.sqrt(2) * math.sqrt(3 / 400) / math.sqrt(3)),
        ("lecun_normal", 1 / math.sqrt(400)),
        ("lecun_uniform", 1 / math.sqrt(400)),
    ],
)
def test_initializer_scales(name, std):
    g = math.sqrt(2) if name.startswith(("kaiming", "he")) else 1.0
    w = nn.initialize(name, 400, 300, np.random.default_rng(0), gain=g)
    assert w.shape == (400, 300)
    assert abs(w.mean()) < 0.02 * std * 10
    assert w.std() == pytest.approx(std, rel=0.02)
    if "uniform" in name:
        assert np.abs(w).max() <= std * math.sqrt(3) + 1e-12


@pytest.mark.parametrize("shape", [(50, 20), (20, 50)])
def test_orthogonal_init(shape):
    w = nn.initialize("orthogonal", *shape, np.random.default_rng(0), gain=2.0)
    small = w.T @ w if shape[0] >= shape[1] else w @ w.T
    np.testing.assert_allclose(small, 4 * np.eye(min(shape)), atol=1e-12)


def test_zeros_init_and_auto_choice():
    m = MLP(4, (3,), 2, init="zeros", seed=0)
    assert not m.params.flat.any()
    m = MLP(100, (200,), 10, activation="tanh", seed=0, dtype="float64")
    bound = math.sqrt(6 / 300)  # xavier uniform, gain 5/3 for tanh
    assert np.abs(m.weights[0]).max() <= 5 / 3 * bound
    assert np.abs(m.weights[0]).max() > 5 / 3 * bound * 0.95
    m = MLP(100, (200,), 10, activation="relu", seed=0, dtype="float64")
    assert np.abs(m.weights[0]).max() == pytest.approx(math.sqrt(6 / 100), rel=0.01)
    m = MLP(3, (4,), 2, init=lambda fi, fo, rng: np.full((fi, fo), 0.5))
    assert (m.weights[0] == 0.5).all()
    with pytest.raises(ValueError, match="shape"):
        MLP(3, (4,), 2, init=lambda fi, fo, rng: np.zeros((1, 1)))


def _digits():
    datasets = import_or_skip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    return X[:1200], y[:1200], X[1200:], y[1200:]


def _train(m, X, y, epochs=15, seed=0):
    opt = fo.Adam(m.params, lr=3e-3)
    Xc, yc = m.check_X(X), m.check_targets(y, len(X))
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, epoch]).permutation(len(X))
        for lo in range(0, len(X), 64):
            m.batch_loss_and_grad(Xc, yc, perm[lo : lo + 64])
            opt.step()


def test_zero_init_fails_to_break_symmetry():
    """All-equal weights give every hidden unit the same gradient, so they stay equal forever:
    with zeros and ReLU nothing but the output bias ever moves; with sigmoid the hidden units
    move, but in lockstep, so the network is as good as a one-unit network."""
    Xtr, ytr, Xte, yte = _digits()
    scores = {}
    for init, act in [("zeros", "relu"), ("zeros", "sigmoid"), ("auto", "sigmoid")]:
        m = MLP(64, (32,), 10, activation=act, init=init, seed=0)
        m.fit_standardizer(Xtr)
        _train(m, Xtr, ytr)
        scores[init, act] = m.evaluate(Xte, yte)["accuracy"]
        w1, w2 = m.weights
        if init == "zeros" and act == "relu":
            assert not w1.any() and not w2.any()
        elif init == "zeros":
            # equal columns of w1 and rows of w2, up to rounding: BLAS computes the columns of a
            # product in tiles of different widths, whose different summation orders give the
            # units different last bits, which 15 epochs of Adam amplify to a few percent
            assert np.abs(w1 - w1[:, :1]).max() < 0.1 * np.abs(w1).max()
            assert np.abs(w2 - w2[:1]).max() < 0.1 * np.abs(w2).max()
        else:  # a random init: the units differ by as much as the weights themselves
            assert np.abs(w1 - w1[:, :1]).max() > 0.5 * np.abs(w1).max()
    assert scores["zeros", "relu"] < 0.2  # the class prior, nothing more
    assert scores["zeros", "sigmoid"] < 0.6
    assert scores["auto", "sigmoid"] > 0.9


# ------------------------------------------------------------------------------ layers


def test_batch_norm_running_stats_and_modes():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 5)) * 3 + 1
    m = MLP(5, (4,), 2, batch_norm=True, activation="identity", dtype="float64", seed=0)
    y = rng.integers(0, 2, 32)
    m.loss_and_grad(X, y)  # training mode: batch statistics
    h = X @ m.weights[0]
    np.testing.assert_allclose(m.buffers["layers.0.bn.running_mean"], 0.1 * h.mean(0))
    np.testing.assert_allclose(
        m.buffers["layers.0.bn.running_var"], 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-12
    )
    ws = m.workspace(32, True)
    z = ws.A[0]  # normalized pre-activations: mean 0, variance 1 per unit (gamma 1, beta 0)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.var(0), 1, rtol=1e-4)
    before = m.buffers["layers.0.bn.running_mean"].copy()
    p1 = m.predict(X)
    np.testing.assert_array_equal(m.buffers["layers.0.bn.running_mean"], before)  # eval: frozen
    np.testing.assert_array_equal(m.predict(X), p1)
    assert m.compute_loss(X, y, train=False) != pytest.approx(m.compute_loss(X, y, train=True))
    with pytest.raises(ValueError, match="more than 1 sample"):
        m.loss_and_grad(X[:1], y[:1])


def test_dropout_masks_rate_scale_and_eval():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 10))
    m = MLP(10, (500,), 1, loss="mse", dropout=0.3, activation="identity", seed=0)
    ws = m.workspace(400, True)
    m.load_batch(ws, m.check_X(X), None, np.arange(400))
    m._forward(ws, True, np.random.default_rng(0))
    a, z = ws.A[0], ws.X @ m.weights[0] + m.biases[0]
    kept = a != 0
    assert kept.mean() == pytest.approx(0.7, abs=0.01)
    np.testing.assert_allclose(a[kept], z[kept] / 0.7, rtol=1e-5)
    # no dropout when evaluating: the same weights without dropout give the same outputs, and so
    # does the forward pass by hand (dropout at evaluation would zero ~30 % of the 500 units)
    plain = MLP(10, (500,), 1, loss="mse", activation="identity", seed=1)
    plain.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(m.predict(X), plain.predict(X))
    W0, W1 = (w.astype(np.float64) for w in m.weights)
    b0, b1 = (b.astype(np.float64) for b in m.biases)
    by_hand = (X @ W0 + b0) @ W1 + b1
    np.testing.assert_allclose(m.predict(X), by_hand, rtol=1e-4, atol=1e-5 * np.abs(by_hand).max())
    y = np.zeros(400)
    assert m.compute_loss(X, y) == plain.compute_loss(X, y) == m.evaluate(X, y)["loss"]
    l1 = m.compute_loss(X, np.zeros(400), train=True, rng=np.random.default_rng(1))
    l2 = m.compute_loss(X, np.zeros(400), train=True, rng=np.random.default_rng(2))
    assert l1 != l2


def test_input_standardization():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3)) * [1, 10, 0] + [5, -2, 7]  # one constant feature
    m = MLP(3, (4,), 2, dtype="float64", seed=0)
    m.fit_standardizer(X)
    np.testing.assert_allclose(m.buffers["input.mean"], X.mean(0))
    np.testing.assert_allclose(
        m.buffers["input.inv_std"], [1 / X[:, 0].std(), 1 / X[:, 1].std(), 1]
    )
    Xs = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1)
    ref = MLP(3, (4,), 2, dtype="float64", seed=0)
    np.testing.assert_allclose(m.predict(X), ref.predict(Xs), rtol=1e-12)
    m.reset_standardizer()
    np.testing.assert_allclose(m.predict(Xs), ref.predict(Xs), rtol=1e-12)


def test_weight_decay_groups_decay_weights_only():
    m = MLP(4, (3,), 2, seed=0, dtype="float64")
    m.params.flat[m.n_weights :] = 1.0
    groups = m.param_groups(weight_decay=0.5)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    opt = fo.SGD(groups, lr=0.1)
    w0 = m.params.flat.copy()
    m.params.zero_grad()
    opt.step(m.grads_for(opt))
    np.testing.assert_allclose(m.params.flat[: m.n_weights], w0[: m.n_weights] * 0.95)
    np.testing.assert_array_equal(m.params.flat[m.n_weights :], 1.0)
    assert m.grads_for(fo.Adam(m.params)) is None
    with pytest.raises(ValueError, match="not a contiguous view"):
        m.grads_for(fo.Adam([np.zeros(3)]))


def test_training_step_allocates_nothing():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 32)).astype(np.float32)
    y = rng.integers(0, 10, 512)
    m = MLP(32, (256, 128), 10, batch_norm=True, dropout=0.1, seed=0)
    opt = fo.Adam(m.params)
    Xc, yc = m.check_X(X), m.check_targets(y, 512)
    batches = [np.arange(lo, lo + 64) for lo in range(0, 512, 64)]
    for idx in batches[:2]:  # workspaces, kernels compiled
        m.batch_loss_and_grad(Xc, yc, idx)
        opt.step()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for idx in batches[2:]:
            m.batch_loss_and_grad(Xc, yc, idx)
            opt.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - base < 16 * 1024  # one (64, 128) float32 array alone is 32 KiB


def test_same_seed_same_model_and_pickle():
    a = MLP(8, (16, 8), 3, seed=5, dropout=0.2, batch_norm=True)
    b = MLP(8, (16, 8), 3, seed=5, dropout=0.2, batch_norm=True)
    np.testing.assert_array_equal(a.params.flat, b.params.flat)
    assert not np.array_equal(
        a.params.flat, MLP(8, (16, 8), 3, seed=6).params.flat[: a.params.size]
    )
    X = np.random.default_rng(0).standard_normal((20, 8))
    y = np.arange(20) % 3
    a.loss_and_grad(X, y)
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.predict(X), a.predict(X))
    assert c.weights[0].base is not None  # still views into one buffer
    a.loss_and_grad(X, y)
    c.loss_and_grad(X, y)  # the dropout generator state travelled too
    np.testing.assert_array_equal(a.params.grad_flat, c.params.grad_flat)
    c.params.flat[0] = 42.0
    assert c.weights[0][0, 0] == 42.0
    d = a.astype("float64")
    assert d.dtype == np.float64
    np.testing.assert_allclose(d.predict(X), a.predict(X), rtol=1e-4, atol=1e-6)
    state = a.state_dict()
    e = MLP(8, (16, 8), 3, seed=0, dropout=0.2, batch_norm=True)
    e.load_state_dict(state)
    np.testing.assert_array_equal(e.predict(X), a.predict(X))
    with pytest.raises(ValueError, match="mismatch"):
        MLP(8, (16,), 3).load_state_dict(state)
    assert "8 -> 16 -> 8 -> 3" in repr(a)


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    m = MLP(4, (5,), 3, seed=0)
    X = np.zeros((6, 4))
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="different numbers of samples: 6 and 5"):
        m.loss_and_grad(X, y[:5])
    with pytest.raises(ValueError, match="has 3 features, but the model expects 4"):
        m.predict(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        m.predict(np.array([[0, np.nan, 0, 0]]))
    with pytest.raises(ValueError, match="2-D"):
        m.predict(np.zeros(4))
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 3\)"):
        m.loss_and_grad(X, [0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="label -1"):
        m.loss_and_grad(X, [0, 1, 2, -1, 0, 1])
    with pytest.raises(ValueError, match="integers"):
        m.loss_and_grad(X, y + 0.5)
    with pytest.raises(TypeError, match="numbers"):
        m.predict(np.array([["a", "b", "c", "d"]]))
    with pytest.raises(ValueError, match="no samples"):
        m.predict(np.zeros((0, 4)))
    r = MLP(4, (5,), 2, loss="mse")
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        r.loss_and_grad(X, np.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        r.loss_and_grad(X, np.full((6, 2), np.inf))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MLP(4, (5,), 2, loss="bce").loss_and_grad(X, np.full((6, 2), 2.0))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(activation="swish"), "unknown activation"),
        (dict(loss="hinge"), "unknown loss"),
        (dict(init="xavier"), "unknown init"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(label_smoothing=0.1, loss="mse"), "label_smoothing"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(device="tpu"), "unknown device"),
        (dict(hidden_sizes=(4, 0)), r"hidden_sizes\[1\]"),
        (dict(n_outputs=1), "n_outputs >= 2"),
        (dict(huber_delta=0.0), "huber_delta"),
        (dict(dropout=float("nan")), "dropout"),
    ],
)
def test_bad_constructor_values(kw, match):
    args = dict(n_features=3, hidden_sizes=(4,), n_outputs=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match) as info:
        MLP(**args)
    assert info.type is ValueError


# a wrong type is a TypeError, as in the optimizers (fastopt.validation)
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dtype="float16"), "float32 or float64"),
        (dict(hidden_sizes=(4, 2.0)), r"hidden_sizes\[1\]"),
        (dict(hidden_sizes=None), "hidden_sizes"),
        (dict(n_features="3"), "n_features"),
        (dict(n_outputs=True), "n_outputs"),
        (dict(dropout="0.1"), "dropout"),
        (dict(label_smoothing=None), "label_smoothing"),
        (dict(bn_eps=[1e-5]), "bn_eps"),
        (dict(batch_norm=1), "batch_norm"),
        (dict(activation=None), "activation"),
    ],
)
def test_wrong_constructor_types(kw, match):
    args = dict(n_features=3, hidden_sizes=(4,), n_outputs=2)
    args.update(kw)
    with pytest.raises(TypeError, match=match):
        MLP(**args)
