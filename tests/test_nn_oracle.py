"""fastopt.nn's activations and losses against torch: value and gradient of every entry of the
registries (``fastopt.nn.ACTIVATIONS``, ``fastopt.nn.LOSSES``), through both array-op backends
(the fused Numba kernels and the whole-array expressions), in float64 and float32.

torch computes in float64 from the same (rounded) inputs, so it is the exact answer up to
float64 rounding; the tolerances are the dtype's rounding (a few ulps, times the condition of the
formula), orders of magnitude below what a wrong constant, sign or term would give."""

import types

import numpy as np
import pytest
from oracle import torch_or_skip

from fastopt.nn import ACTIVATIONS, LOSSES
from fastopt.nn.losses import batch_loss
from fastopt.nn.ops import ArrayOps, NumbaOps

torch = torch_or_skip()
F = torch.nn.functional

pytestmark = pytest.mark.oracle

DTYPES = ["float64", "float32"]
BACKENDS = {"numba": lambda: NumbaOps(parallel=False), "array": lambda: ArrayOps(np)}
# relative tolerance, absolute tolerance (relative to the largest magnitude) per dtype
TOL = {"float64": (1e-12, 1e-14), "float32": (3e-6, 3e-7)}

ALPHA = {"leaky_relu": 0.07, "elu": 1.3}
TORCH_ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, negative_slope=ALPHA["leaky_relu"]),
    "elu": lambda z: F.elu(z, alpha=ALPHA["elu"]),
    "gelu": lambda z: F.gelu(z, approximate="none"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z.clone(),
}


def test_every_registered_activation_and_loss_has_a_torch_reference():
    assert set(TORCH_ACTIVATIONS) == set(ACTIVATIONS)
    assert set(TORCH_LOSSES) | {"cross_entropy"} == set(LOSSES) | {"soft_cross_entropy"}


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol * scale, err_msg=what
    )


def _inputs(dtype, n=9, m=70, seed=0):
    """Pre-activations over [-6, 6] (both signs, the sigmoid/tanh tails) away from the relu kink,
    and an upstream gradient. 70 columns: more than one column block of the kernels."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-6, 6, (n, m))
    z[np.abs(z) < 1e-3] = 0.5
    z[0, :8] = [-1e-2, 1e-2, -0.3, 0.3, -40.0, 40.0, 2.0, -2.0]  # small, and saturated
    g = rng.standard_normal((n, m))
    return z.astype(dtype), g.astype(dtype)


def _act_torch(name, z, g, keep=None, p=0.0):
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    a = TORCH_ACTIVATIONS[name](zt)
    if keep is not None:
        a = a * torch.tensor(keep, dtype=torch.float64) / (1.0 - p)
    a.backward(torch.tensor(g, dtype=torch.float64))
    return a.detach().numpy(), zt.grad.numpy()


def _act_ours(ops, name, z, g, U=None, p=0.0):
    n, m = z.shape
    dt = z.dtype
    act, alpha = ACTIVATIONS[name], ALPHA.get(name, 0.0)
    drop = U is not None
    U = U if drop else np.zeros((1, 1), dt)
    scale = 1.0 / (1.0 - p)
    Z, A, D = (np.empty((n, m), dt) for _ in range(3))
    db = np.empty(m, dt)
    ones, zeros = np.ones(m, dt), np.zeros(m, dt)
    ops.act_forward(z, ones, zeros, Z, A, act, alpha, U, p, scale, drop)
    ops.act_backward(g, Z, A, act, alpha, U, p, scale, D, db, drop, True)
    return A, D, db


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_value_and_gradient_match_torch(name, dtype, backend):
    z, g = _inputs(dtype)
    a, d, db = _act_ours(BACKENDS[backend](), name, z, g)
    ref_a, ref_d = _act_torch(name, z, g)
    _close(a, ref_a, dtype, f"{name} forward")
    _close(d, ref_d, dtype, f"{name} derivative")
    _close(db, ref_d.sum(axis=0), dtype, f"{name} bias gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_with_dropout_matches_torch(name, dtype, backend):
    """Inverted dropout with the mask ``U >= p``: forward and derivative (taken from the scaled
    output where the activation's derivative comes from its output) as torch's a·mask/(1-p)."""
    p = 0.3
    z, g = _inputs(dtype, seed=1)
    U = np.random.default_rng(2).random(z.shape).astype(dtype)
    a, d, db = _act_ours(BACKENDS[backend](), name, z, g, U=U, p=p)
    keep = U >= U.dtype.type(p)
    assert 0.6 < keep.mean() < 0.8
    ref_a, ref_d = _act_torch(name, z, g, keep=keep, p=p)
    _close(a, ref_a, dtype, f"{name} forward, dropout")
    _close(d, ref_d, dtype, f"{name} derivative, dropout")
    _close(db, ref_d.sum(axis=0), dtype, f"{name} bias gradient, dropout")


# ------------------------------------------------------------------------------ losses

HUBER_DELTA = 0.8


def _probabilities(rng, n, k):
    t = rng.dirichlet(np.ones(k), n)
    t[0] = np.eye(k)[1]  # a one-hot row: 0·log 0 terms
    return t


TORCH_LOSSES = {
    # name: (registry loss, fastopt target kind, torch loss of (logits, targets), mean divisor)
    "soft_cross_entropy": (
        "cross_entropy",
        "probabilities",
        lambda z, t: F.cross_entropy(z, t),
    ),
    "kl_div": (
        "kl_div",
        "probabilities",
        lambda z, t: F.kl_div(F.log_softmax(z, dim=1), t, reduction="batchmean"),
    ),
    "bce": ("bce", "binary", F.binary_cross_entropy_with_logits),
    "mse": ("mse", "real", F.mse_loss),
    "l1": ("l1", "real", F.l1_loss),
    "huber": ("huber", "real", lambda z, t: F.huber_loss(z, t, delta=HUBER_DELTA)),
}


def _workspace(n, k, dtype, labels=None, T=None):
    return types.SimpleNamespace(
        labels=labels,
        T=T,
        row_loss=np.empty(n),
        row_correct=np.empty(n, np.int64),
        row_abs=np.empty(n),
        row_sq=np.empty(n),
    )


def _logits(dtype, n=11, k=5, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)) * 3
    z[1] = [30.0, -30.0, 0.0, 1.0, 2.0]  # a confident row: the softmax must not overflow
    return z.astype(dtype), rng


def _torch_grad(loss_fn, z, t):
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    out = loss_fn(zt, t)
    out.backward()
    return out.item(), zt.grad.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_cross_entropy_with_labels_matches_torch(smoothing, dtype, backend):
    z, rng = _logits(dtype)
    n, k = z.shape
    y = rng.integers(0, k, n)
    ws = _workspace(n, k, dtype, labels=y)
    D = np.empty_like(z)
    total, correct, _ = batch_loss(
        LOSSES["cross_entropy"], BACKENDS[backend](), z, D, ws, labels=True,
        label_smoothing=smoothing,
    )  # fmt: skip
    ref, ref_d = _torch_grad(
        lambda zt, t: F.cross_entropy(zt, t, label_smoothing=smoothing), z, torch.tensor(y)
    )
    _close(total / n, ref, dtype, "cross-entropy value")
    _close(D, ref_d, dtype, "cross-entropy gradient")
    assert correct == int((z.argmax(1) == y).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(TORCH_LOSSES))
def test_loss_value_and_gradient_match_torch(name, dtype, backend):
    loss_name, kind, torch_fn = TORCH_LOSSES[name]
    loss = LOSSES[loss_name]
    z, rng = _logits(dtype, seed=3)
    n, k = z.shape
    if kind == "probabilities":
        t = _probabilities(rng, n, k)
    elif kind == "binary":
        t = (rng.random((n, k)) < 0.5).astype(float)
        t[0] = 0.3  # probabilities too
    else:
        t = z + rng.standard_normal((n, k)) * 1.5  # errors on both sides of huber_delta
        t[0, 0] = z[0, 0]  # a zero error (l1: subgradient 0, as torch)
    t = t.astype(dtype)
    ws = _workspace(n, k, dtype, T=t)
    D = np.empty_like(z)
    total, stat1, stat2 = batch_loss(
        loss, BACKENDS[backend](), z, D, ws, labels=False, huber_delta=HUBER_DELTA
    )
    ref, ref_d = _torch_grad(torch_fn, z, torch.tensor(t, dtype=torch.float64))
    mean = total / (n * k if loss.per_element else n)
    _close(mean, ref, dtype, f"{name} value")
    _close(D, ref_d, dtype, f"{name} gradient")
    e = z.astype(np.float64) - t
    if loss.classification:
        want = (z > 0) == (t >= 0.5) if loss.head == "sigmoid" else z.argmax(1) == t.argmax(1)
        assert stat1 == int(want.sum())
    else:
        _close(stat1, np.abs(e).sum(), dtype, "sum |error|")
        _close(stat2, (e * e).sum(), dtype, "sum error²")
