"""A multilayer perceptron whose weights and biases live in one :class:`~fastopt.ParamSet`.

::

    import fastopt as fo
    from fastopt.nn import MLP

    model = MLP(64, (128, 128), 10, activation="relu", loss="cross_entropy", seed=0)
    model.fit_standardizer(X_train)               # input standardization, fitted on training data
    opt = fo.Adam(model.param_groups(weight_decay=1e-4), lr=1e-3)
    loss = model.loss_and_grad(X_batch, y_batch)  # forward + backward into model.params.grads
    opt.step(model.grads_for(opt))                 # or opt = fo.Adam(model.params); opt.step()
    proba = model.predict(X_test)

Layers: ``Linear -> [BatchNorm] -> activation -> [Dropout]`` for every hidden layer, then a
linear output layer whose *head* is fixed by the loss:

=================  ==========  =================================================================
``loss``           head        targets; reduction (torch's defaults)
=================  ==========  =================================================================
``cross_entropy``  softmax     int labels in [0, K) (``label_smoothing``), or rows of
                               probabilities; mean over samples
``kl_div``         softmax     rows of probabilities; KL(t || softmax(z)) summed over classes,
                               mean over samples (torch ``KLDivLoss(reduction="batchmean")``)
``bce``            sigmoid     0/1 (or probabilities) of shape (n, K); mean over all elements
``mse``            identity    real values (n, K) or (n,) when K == 1; mean over all elements
``l1``             identity    as mse
``huber``          identity    as mse (``huber_delta``)
=================  ==========  =================================================================

Activations: relu, leaky_relu (``negative_slope``), elu (``elu_alpha``), gelu (exact, erf),
tanh, sigmoid, identity. Initializers: zeros, normal (std 0.01), xavier/glorot normal and
uniform, kaiming/he normal and uniform, lecun normal and uniform, orthogonal, or a callable
``init(fan_in, fan_out, rng) -> array``; ``"auto"`` is Kaiming uniform for the relu family and
Xavier uniform otherwise (the output layer always Xavier uniform). Biases start at zero.
L2 regularization is the optimizer's ``weight_decay``; :meth:`MLP.param_groups` puts it on the
weights only.

Forward and backward are hand written: the matrix products go to BLAS through the array
module's ``matmul`` (NumPy's BLAS; CuPy's cuBLAS for ``device="cuda"``), everything elementwise
(bias + activation + dropout, activation backward + bias gradient, the fused softmax/sigmoid
losses, batch norm) is one fused Numba kernel per layer (``fastopt.kernels.nn_cpu``) on the CPU.
Weights are stored (fan_in, fan_out) so that ``Z = X @ W``. Backward writes the gradients straight
into ``params.grads`` (overwriting them) and a step allocates no arrays: every intermediate lives
in a workspace preallocated per batch size.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import numpy as np

from .paramset import ParamSet

__all__ = [
    "ACTIVATIONS",
    "INITIALIZERS",
    "LOSSES",
    "MLP",
    "initialize",
]

ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid", "identity")
LOSSES = {
    "cross_entropy": "softmax",
    "kl_div": "softmax",
    "bce": "sigmoid",
    "mse": "identity",
    "l1": "identity",
    "huber": "identity",
}
INITIALIZERS = (
    "auto",
    "zeros",
    "normal",
    "xavier_normal",
    "xavier_uniform",
    "glorot_normal",
    "glorot_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
)
_ALIASES = {
    "glorot_normal": "xavier_normal",
    "glorot_uniform": "xavier_uniform",
    "he_normal": "kaiming_normal",
    "he_uniform": "kaiming_uniform",
}
_CLASSIFICATION = ("cross_entropy", "kl_div", "bce")
_WORKSPACES = 6
"""Workspaces (one per batch size and mode) kept per model, least recently used dropped first."""


# ------------------------------------------------------------------------------ initialization


def gain(activation, *, negative_slope=0.01):
    """The recommended gain of an activation (``torch.nn.init.calculate_gain``; elu and gelu get
    relu's sqrt(2), the usual choice)."""
    if activation in ("relu", "elu", "gelu"):
        return math.sqrt(2.0)
    if activation == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + negative_slope**2))
    if activation == "tanh":
        return 5.0 / 3.0
    if activation in ("sigmoid", "identity"):
        return 1.0
    raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")


def initialize(name, fan_in, fan_out, rng, *, gain=1.0, std=0.01):
    """A (fan_in, fan_out) float64 weight matrix drawn by initializer ``name`` from ``rng``.

    ``zeros``; ``normal``: N(0, std²); ``xavier_normal``: std = gain·sqrt(2/(fan_in+fan_out));
    ``xavier_uniform``: U(±gain·sqrt(6/(fan_in+fan_out))) (Glorot & Bengio 2010);
    ``kaiming_normal``: std = gain/sqrt(fan_in); ``kaiming_uniform``: U(±gain·sqrt(3/fan_in))
    (He et al. 2015, fan_in mode, the gain being the activation's); ``lecun_normal``:
    std = 1/sqrt(fan_in); ``lecun_uniform``: U(±sqrt(3/fan_in)) (LeCun et al. 1998);
    ``orthogonal``: gain times a matrix with orthonormal rows or columns (Saxe et al. 2014; the QR
    of a Gaussian matrix, signs fixed as in ``torch.nn.init.orthogonal_``).
    """
    name = _ALIASES.get(name, name)
    shape = (fan_in, fan_out)
    if name == "zeros":
        return np.zeros(shape)
    if name == "normal":
        return rng.normal(0.0, std, shape)
    if name == "xavier_normal":
        return rng.normal(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), shape)
    if name == "xavier_uniform":
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, shape)
    if name == "kaiming_normal":
        return rng.normal(0.0, gain / math.sqrt(fan_in), shape)
    if name == "kaiming_uniform":
        bound = gain * math.sqrt(3.0 / fan_in)
        return rng.uniform(-bound, bound, shape)
    if name == "lecun_normal":
        return rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)
    if name == "lecun_uniform":
        bound = math.sqrt(3.0 / fan_in)
        return rng.uniform(-bound, bound, shape)
    if name == "orthogonal":
        rows, cols = max(shape), min(shape)
        q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
        q *= np.sign(np.diag(r))
        if fan_in < fan_out:
            q = q.T
        return gain * q
    raise ValueError(f"unknown initializer {name!r}; known: {', '.join(INITIALIZERS)}")


# ------------------------------------------------------------------------------ array operations


class _NumbaOps:
    """The fused Numba CPU kernels (``fastopt.kernels.nn_cpu``)."""

    name = "numba"

    def __init__(self, parallel_threshold=None, parallel=True):
        from .kernels import nn_cpu

        self.k = nn_cpu
        self.threshold = parallel_threshold
        self.parallel = parallel

    def _pick(self, kernel, elements):
        if not self.parallel:
            return kernel.serial
        return self.k.pick(kernel, elements, self.threshold)

    def act_forward(self, H, s, b, Z, A, code, alpha, U, p, scale, drop):
        self._pick(self.k.act_forward, A.size)(H, s, b, Z, A, code, alpha, U, p, scale, drop)

    def act_backward(self, G, Z, A, code, alpha, U, p, scale, D, db, drop, has_bias):
        self._pick(self.k.act_backward, D.size)(
            G, Z, A, code, alpha, U, p, scale, D, db, drop, has_bias
        )

    def col_sums(self, D, out):
        self._pick(self.k.col_sums, D.size)(D, out)

    def softmax_xent(self, Z, y, smoothing, scale, D, row_loss, row_correct):
        return self._pick(self.k.softmax_xent, Z.size)(
            Z, y, smoothing, scale, D, row_loss, row_correct
        )

    def softmax_soft(self, Z, T, kl, scale, D, row_loss, row_correct):
        return self._pick(self.k.softmax_soft, Z.size)(Z, T, kl, scale, D, row_loss, row_correct)

    def sigmoid_bce(self, Z, T, scale, D, row_loss, row_correct):
        return self._pick(self.k.sigmoid_bce, Z.size)(Z, T, scale, D, row_loss, row_correct)

    def regression(self, Z, T, kind, delta, scale, D, row_loss, row_abs, row_sq):
        return self._pick(self.k.regression, Z.size)(
            Z, T, kind, delta, scale, D, row_loss, row_abs, row_sq
        )

    def bn_train(self, H, gamma, beta, eps, momentum, rm, rv, update, mean, invstd, s, b):
        self._pick(self.k.bn_train, H.size)(
            H, gamma, beta, eps, momentum, rm, rv, update, mean, invstd, s, b
        )

    def bn_backward(self, G, H, mean, invstd, gamma, dgamma, dbeta, DH, batch_stats):
        self._pick(self.k.bn_backward, G.size)(
            G, H, mean, invstd, gamma, dgamma, dbeta, DH, batch_stats
        )

    def gather(self, X, idx, mean, inv_std, standardize, out):
        self._pick(self.k.gather_rows, out.size)(X, idx, mean, inv_std, standardize, out)


class _ArrayOps:
    """The same operations as whole-array expressions of an array module ``xp`` (NumPy or CuPy):
    the GPU path and, with NumPy, the readable reference the Numba kernels are tested against.
    Allocates temporaries (unlike the kernels)."""

    name = "array"

    def __init__(self, xp):
        self.xp = xp
        if xp is np:
            self._erf = np.vectorize(math.erf, otypes=[np.float64])
        else:  # pragma: no cover - needs CuPy
            from cupyx.scipy.special import erf

            self._erf = erf

    def _act(self, code, z, alpha):
        xp = self.xp
        from .kernels.nn_cpu import ELU, GELU, IDENTITY, LEAKY_RELU, RELU, TANH

        if code == IDENTITY:
            return z.copy()
        if code == RELU:
            return xp.where(z < 0, z.dtype.type(0), z)
        if code == LEAKY_RELU:
            return xp.where(z < 0, z * z.dtype.type(alpha), z)
        if code == ELU:
            return xp.where(z < 0, z.dtype.type(alpha) * xp.expm1(z), z)
        if code == GELU:
            return (0.5 * z * (1.0 + self._erf(z * _SQRT_HALF))).astype(z.dtype)
        if code == TANH:
            return xp.tanh(z)
        e = xp.exp(-xp.abs(z))
        return xp.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype)

    def _deriv(self, code, z, a, alpha, inv):
        xp = self.xp
        from .kernels.nn_cpu import ELU, GELU, IDENTITY, LEAKY_RELU, RELU, TANH

        t = a.dtype.type
        if code == IDENTITY:
            return xp.ones_like(a)
        if code == RELU:
            return (a > 0).astype(a.dtype)
        if code == LEAKY_RELU:
            return xp.where(a > 0, t(1), t(alpha))
        if code == ELU:
            v = a * t(inv)
            return xp.where(v > 0, t(1), v + t(alpha))
        if code == GELU:
            cdf = 0.5 * (1.0 + self._erf(z * _SQRT_HALF))
            pdf = _INV_SQRT_2PI * xp.exp(-0.5 * z * z)
            return (cdf + z * pdf).astype(a.dtype)
        v = a * t(inv)
        if code == TANH:
            return 1 - v * v
        return v * (1 - v)

    def act_forward(self, H, s, b, Z, A, code, alpha, U, p, scale, drop):
        from .kernels.nn_cpu import GELU

        v = H * s + b
        if code == GELU:
            Z[...] = v
        a = self._act(code, v, alpha)
        if drop:
            a = self.xp.where(U >= U.dtype.type(p), a * a.dtype.type(scale), a.dtype.type(0))
        A[...] = a

    def act_backward(self, G, Z, A, code, alpha, U, p, scale, D, db, drop, has_bias):
        inv = (1.0 - p) if drop else 1.0
        d = G * self._deriv(code, Z, A, alpha, inv)
        if drop:
            d = self.xp.where(U >= U.dtype.type(p), d * d.dtype.type(scale), d.dtype.type(0))
        D[...] = d
        if has_bias:
            db[...] = D.sum(axis=0)

    def col_sums(self, D, out):
        out[...] = D.sum(axis=0)

    def softmax_xent(self, Z, y, smoothing, scale, D, row_loss, row_correct):
        xp = self.xp
        n, k = Z.shape
        rows = xp.arange(n)
        mx = Z.max(axis=1, keepdims=True)
        e = xp.exp(Z - mx)
        s = e.sum(axis=1, keepdims=True)
        lse = (mx + xp.log(s))[:, 0].astype(np.float64)
        zl = Z[rows, y].astype(np.float64)
        row_loss[...] = lse - (1 - smoothing) * zl - smoothing / k * Z.sum(axis=1)
        row_correct[...] = Z.argmax(axis=1) == y
        t = Z.dtype.type
        g = (e / s - t(smoothing / k)) * t(scale)
        g[rows, y] -= t(1 - smoothing) * t(scale)
        D[...] = g
        return float(row_loss.sum()), int(row_correct.sum())

    def softmax_soft(self, Z, T, kl, scale, D, row_loss, row_correct):
        xp = self.xp
        mx = Z.max(axis=1, keepdims=True)
        e = xp.exp(Z - mx)
        s = e.sum(axis=1, keepdims=True)
        logp = (Z - mx - xp.log(s)).astype(np.float64)
        t64 = T.astype(np.float64)
        loss = -(t64 * logp).sum(axis=1)
        if kl:
            safe = xp.where(t64 > 0, t64, 1.0)
            loss = loss + (t64 * xp.log(safe)).sum(axis=1)
        row_loss[...] = loss
        row_correct[...] = Z.argmax(axis=1) == T.argmax(axis=1)
        t = Z.dtype.type
        D[...] = (e / s * T.sum(axis=1, keepdims=True) - T) * t(scale)
        return float(row_loss.sum()), int(row_correct.sum())

    def sigmoid_bce(self, Z, T, scale, D, row_loss, row_correct):
        xp = self.xp
        e = xp.exp(-xp.abs(Z))
        loss = xp.maximum(Z, 0) - Z * T + xp.log1p(e)
        row_loss[...] = loss.astype(np.float64).sum(axis=1)
        row_correct[...] = ((Z > 0) == (T >= 0.5)).sum(axis=1)
        sig = xp.where(Z >= 0, 1 / (1 + e), e / (1 + e))
        D[...] = (sig - T) * Z.dtype.type(scale)
        return float(row_loss.sum()), int(row_correct.sum())

    def regression(self, Z, T, kind, delta, scale, D, row_loss, row_abs, row_sq):
        xp = self.xp
        from .kernels.nn_cpu import L1, MSE

        t = Z.dtype.type
        e = Z - T
        ae = xp.abs(e)
        e64 = e.astype(np.float64)
        row_abs[...] = ae.astype(np.float64).sum(axis=1)
        row_sq[...] = (e64 * e64).sum(axis=1)
        if kind == MSE:
            row_loss[...] = row_sq
            D[...] = 2 * e * t(scale)
        elif kind == L1:
            row_loss[...] = row_abs
            D[...] = xp.sign(e) * t(scale)
        else:
            small = ae <= t(delta)
            loss = xp.where(small, 0.5 * e * e, t(delta) * (ae - 0.5 * t(delta)))
            row_loss[...] = loss.astype(np.float64).sum(axis=1)
            D[...] = xp.where(small, e, t(delta) * xp.sign(e)) * t(scale)
        return float(row_loss.sum()), float(row_abs.sum()), float(row_sq.sum())

    def bn_train(self, H, gamma, beta, eps, momentum, rm, rv, update, mean, invstd, s, b):
        xp = self.xp
        n = H.shape[0]
        h64 = H.astype(np.float64)
        mu = h64.mean(axis=0)
        mean[...] = mu
        var = ((h64 - mean.astype(np.float64)) ** 2).mean(axis=0)
        invstd[...] = 1.0 / xp.sqrt(var + eps)
        s[...] = gamma * invstd
        b[...] = beta - mean * s
        if update:
            unbias = n / (n - 1.0) if n > 1 else 1.0
            rm[...] = (1 - momentum) * rm.astype(np.float64) + momentum * mean.astype(np.float64)
            rv[...] = (1 - momentum) * rv.astype(np.float64) + momentum * var * unbias

    def bn_backward(self, G, H, mean, invstd, gamma, dgamma, dbeta, DH, batch_stats):
        n = G.shape[0]
        xh = (H - mean) * invstd
        sg = G.astype(np.float64).sum(axis=0)
        sgx = (G * xh).astype(np.float64).sum(axis=0)
        dbeta[...] = sg
        dgamma[...] = sgx
        if batch_stats:
            t = G.dtype.type
            DH[...] = gamma * invstd / t(n) * (t(n) * G - dbeta - xh * dgamma)
        else:
            DH[...] = G * (gamma * invstd)

    def gather(self, X, idx, mean, inv_std, standardize, out):
        rows = X[idx]
        if standardize:
            out[...] = (rows.astype(np.float64) - mean) * inv_std
        else:
            out[...] = rows


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# ------------------------------------------------------------------------------ workspace


class _Workspace:
    """Every intermediate array of one forward(+backward) pass over ``n`` rows.

    Per layer l: ``H`` the matrix product, ``A`` the activation output (the output layer's
    values for the last layer), ``Z`` the pre-activation (GELU only: its derivative needs it),
    ``U`` the dropout uniforms; backward: ``G`` = dLoss/dA, ``D`` = dLoss/d(pre-activation).
    For a batch-norm layer the batch-norm backward writes dLoss/dH into ``G``. No two of these
    alias: the kernels vectorize only over distinct arrays."""

    def __init__(self, model, n, train):
        xp, dt = model._xp, model.dtype
        L = model.n_layers
        self.n = n
        self.train = train
        self.X = xp.empty((n, model.n_features), dt)
        self.H, self.Z, self.A, self.G, self.D, self.U = ([None] * L for _ in range(6))
        self.mean, self.invstd, self.s, self.shift = ([None] * L for _ in range(4))
        for l, width in enumerate(model.sizes[1:]):
            hidden = l < L - 1
            bn = hidden and model.batch_norm
            self.H[l] = xp.empty((n, width), dt)
            self.A[l] = xp.empty((n, width), dt)
            self.Z[l] = (
                xp.empty((n, width), dt) if hidden and model.activation == "gelu" else model._e2
            )
            if train and hidden:
                self.G[l] = xp.empty((n, width), dt)
            if train or not hidden:
                self.D[l] = xp.empty((n, width), dt)
            if train and hidden and model.dropout > 0:
                self.U[l] = xp.empty((n, width), dt)
            if bn:
                self.mean[l] = xp.empty(width, dt)
                self.invstd[l] = xp.empty(width, dt)
                self.s[l] = xp.empty(width, dt)
                self.shift[l] = xp.empty(width, dt)
        k = model.n_outputs
        self.row_loss = xp.empty(n, np.float64)
        self.row_correct = xp.empty(n, np.int64)
        self.row_abs = xp.empty(n, np.float64)
        self.row_sq = xp.empty(n, np.float64)
        self.labels = xp.empty(n, np.int64) if model.loss == "cross_entropy" else None
        self.T = xp.empty((n, k), dt)


# ------------------------------------------------------------------------------ the model


class MLP:
    """A multilayer perceptron ``n_features -> hidden_sizes... -> n_outputs`` (see the module
    docstring for layers, heads and losses).

    Parameters live in ``params`` (a ParamSet: all weights first, then biases and batch-norm
    scales/shifts); ``buffers`` holds the non-trained state (batch-norm running statistics, the
    input standardization). ``seed`` fixes the initialization and the default dropout generator.

    ``backend``: ``"numba"`` (fused CPU kernels, the default on the CPU) or ``"array"``
    (whole-array expressions of NumPy/CuPy: the GPU path and the test reference).
    ``parallel_kernels``: run the Numba kernels multithreaded on large batches. Off by default:
    between two multithreaded BLAS calls a second thread pool slows a step down several times
    (see ``fastopt.kernels.nn_cpu``); turn it on when the BLAS runs single-threaded.
    """

    def __init__(
        self,
        n_features,
        hidden_sizes=(100,),
        n_outputs=1,
        *,
        activation="relu",
        loss="cross_entropy",
        init="auto",
        batch_norm=False,
        dropout=0.0,
        label_smoothing=0.0,
        huber_delta=1.0,
        negative_slope=0.01,
        elu_alpha=1.0,
        bn_momentum=0.1,
        bn_eps=1e-5,
        dtype="float32",
        device="cpu",
        seed=None,
        backend=None,
        parallel_kernels=False,
    ):
        from .kernels.nn_cpu import ACTIVATION_CODES, REGRESSION_CODES

        n_features = _posint("n_features", n_features)
        n_outputs = _posint("n_outputs", n_outputs)
        if isinstance(hidden_sizes, numbers.Integral) and not isinstance(hidden_sizes, bool):
            hidden_sizes = (hidden_sizes,)
        try:
            hidden_sizes = tuple(hidden_sizes)
        except TypeError:
            raise TypeError(
                f"hidden_sizes must be a sequence of positive ints, got {hidden_sizes!r}"
            ) from None
        hidden_sizes = tuple(_posint(f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes))
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        if not callable(init) and init not in INITIALIZERS:
            raise ValueError(f"unknown init {init!r}; known: {', '.join(INITIALIZERS)}")
        if not isinstance(batch_norm, (bool, np.bool_)):
            raise TypeError(f"batch_norm must be a bool, got {batch_norm!r}")
        dropout = _real("dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        label_smoothing = _real("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
        if label_smoothing and loss != "cross_entropy":
            raise ValueError("label_smoothing applies to loss='cross_entropy' only")
        huber_delta = _real("huber_delta", huber_delta, lo=0.0, lo_open=True)
        negative_slope = _real("negative_slope", negative_slope, lo=0.0)
        elu_alpha = _real("elu_alpha", elu_alpha, lo=0.0, lo_open=True)
        bn_momentum = _real("bn_momentum", bn_momentum, lo=0.0, hi=1.0)
        bn_eps = _real("bn_eps", bn_eps, lo=0.0, lo_open=True)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if loss in ("cross_entropy", "kl_div") and n_outputs < 2:
            raise ValueError(f"loss={loss!r} needs n_outputs >= 2 classes, got {n_outputs}")

        self._config = dict(
            n_features=n_features,
            hidden_sizes=hidden_sizes,
            n_outputs=n_outputs,
            activation=activation,
            loss=loss,
            init=init,
            batch_norm=bool(batch_norm),
            dropout=dropout,
            label_smoothing=label_smoothing,
            huber_delta=huber_delta,
            negative_slope=negative_slope,
            elu_alpha=elu_alpha,
            bn_momentum=bn_momentum,
            bn_eps=bn_eps,
            dtype=dtype.name,
            device=device,
            seed=seed,
            backend=backend,
            parallel_kernels=bool(parallel_kernels),
        )
        self.n_features = n_features
        self.hidden_sizes = hidden_sizes
        self.n_outputs = n_outputs
        self.sizes = (n_features, *hidden_sizes, n_outputs)
        self.n_layers = len(self.sizes) - 1
        self.activation = activation
        self.loss = loss
        self.head = LOSSES[loss]
        self.batch_norm = bool(batch_norm)
        self.dropout = dropout
        self.label_smoothing = label_smoothing
        self.huber_delta = huber_delta
        self.negative_slope = negative_slope
        self.elu_alpha = elu_alpha
        self.bn_momentum = bn_momentum
        self.bn_eps = bn_eps
        self.dtype = dtype
        self.device = device
        self._act_code = ACTIVATION_CODES[activation]
        self._alpha = negative_slope if activation == "leaky_relu" else elu_alpha
        self._reg_code = REGRESSION_CODES.get(loss, 0)

        self._xp = xp = _array_module(device)
        if backend is None:
            backend = "numba" if xp is np else "array"
        if backend == "numba":
            if xp is not np:
                raise ValueError("backend='numba' runs on the CPU; use backend='array' on a GPU")
            self._ops = _NumbaOps(parallel=bool(parallel_kernels))
        elif backend == "array":
            self._ops = _ArrayOps(xp)
        else:
            raise ValueError(f"unknown backend {backend!r}; expected 'numba' or 'array'")

        rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng(rng.integers(2**63))
        """Generator of the dropout masks when no ``rng`` is passed (seeded from ``seed``)."""
        self.params = ParamSet(self._initial_params(init, rng), dtype=dtype, device=device)
        self.n_weights = sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:]))
        """Elements of the weight matrices: ``params.flat[:n_weights]`` (they come first)."""
        self.buffers = {}
        for l in range(self.n_layers - 1):
            if self.batch_norm:
                w = self.sizes[l + 1]
                self.buffers[f"layers.{l}.bn.running_mean"] = xp.zeros(w, dtype)
                self.buffers[f"layers.{l}.bn.running_var"] = xp.ones(w, dtype)
        self.buffers["input.mean"] = xp.zeros(n_features, np.float64)
        self.buffers["input.inv_std"] = xp.ones(n_features, np.float64)
        self._bind()

    # -------------------------------------------------------------------------- construction
    def _initial_params(self, init, rng):
        weights, rest = {}, {}
        L = self.n_layers
        for l in range(L):
            fan_in, fan_out = self.sizes[l], self.sizes[l + 1]
            hidden = l < L - 1
            if callable(init):
                w = np.asarray(init(fan_in, fan_out, rng), dtype=np.float64)
                if w.shape != (fan_in, fan_out):
                    raise ValueError(
                        f"init returned shape {w.shape} for layer {l}, expected {(fan_in, fan_out)}"
                    )
            else:
                name = init
                g = gain(self.activation, negative_slope=self.negative_slope) if hidden else 1.0
                if init == "auto":
                    relu_like = self.activation in ("relu", "leaky_relu", "elu", "gelu")
                    name = "kaiming_uniform" if hidden and relu_like else "xavier_uniform"
                w = initialize(name, fan_in, fan_out, rng, gain=g)
            weights[f"layers.{l}.weight"] = w
            if hidden and self.batch_norm:
                rest[f"layers.{l}.bn.weight"] = np.ones(fan_out)
                rest[f"layers.{l}.bn.bias"] = np.zeros(fan_out)
            else:
                rest[f"layers.{l}.bias"] = np.zeros(fan_out)
        return {**weights, **rest}

    def _bind(self):
        """Cache the parameter/gradient views and the empty placeholder arrays."""
        ps, xp, dt = self.params, self._xp, self.dtype
        L = self.n_layers
        self._W = [ps[f"layers.{l}.weight"] for l in range(L)]
        self._gW = [ps.grads[f"layers.{l}.weight"] for l in range(L)]
        self._b, self._gb, self._gamma, self._ggamma = ([None] * L for _ in range(4))
        self._beta, self._gbeta, self._rm, self._rv = ([None] * L for _ in range(4))
        for l in range(L):
            if l < L - 1 and self.batch_norm:
                self._gamma[l] = ps[f"layers.{l}.bn.weight"]
                self._ggamma[l] = ps.grads[f"layers.{l}.bn.weight"]
                self._beta[l] = ps[f"layers.{l}.bn.bias"]
                self._gbeta[l] = ps.grads[f"layers.{l}.bn.bias"]
                self._rm[l] = self.buffers[f"layers.{l}.bn.running_mean"]
                self._rv[l] = self.buffers[f"layers.{l}.bn.running_var"]
            else:
                self._b[l] = ps[f"layers.{l}.bias"]
                self._gb[l] = ps.grads[f"layers.{l}.bias"]
        self._mean = self.buffers["input.mean"]
        self._inv_std = self.buffers["input.inv_std"]
        self._e1 = xp.zeros(1, dt)
        self._e2 = xp.zeros((1, 1), dt)
        self._ones = [xp.ones(w, dt) for w in self.sizes[1:]]
        self._workspaces = OrderedDict()

    # -------------------------------------------------------------------------- views
    @property
    def weights(self):
        """The weight matrices (views into ``params``), layer by layer, shape (fan_in, fan_out)."""
        return list(self._W)

    @property
    def biases(self):
        """The bias vectors (views; ``None`` for hidden layers with batch norm, whose batch-norm
        shift plays that role)."""
        return list(self._b)

    @property
    def is_classifier(self):
        return self.loss in _CLASSIFICATION

    def __repr__(self):
        extra = []
        if self.batch_norm:
            extra.append("batch_norm=True")
        if self.dropout:
            extra.append(f"dropout={self.dropout}")
        if self.label_smoothing:
            extra.append(f"label_smoothing={self.label_smoothing}")
        tail = "".join(", " + e for e in extra)
        return (
            f"MLP({' -> '.join(map(str, self.sizes))}, activation={self.activation!r}, "
            f"loss={self.loss!r}{tail}, dtype={self.dtype.name}, device={self.device!r}, "
            f"parameters={self.params.size})"
        )

    # -------------------------------------------------------------------------- weight decay
    def param_groups(self, weight_decay=0.0, **overrides):
        """Two optimizer param groups over views of ``params``: the weights with
        ``weight_decay``, everything else (biases, batch-norm scales and shifts) without.
        Step with ``opt.step(model.grads_for(opt))``."""
        flat = self.params.flat
        nw = self.n_weights
        groups = [{"params": [_own_view(flat, 0, nw)], "weight_decay": weight_decay, **overrides}]
        if nw < flat.size:
            rest = _own_view(flat, nw, flat.size)
            groups.append({"params": [rest], "weight_decay": 0.0, **overrides})
        return groups

    def grads_for(self, optimizer):
        """The ``grads`` argument of ``optimizer.step`` for an optimizer over this model's
        parameters: ``None`` (the ParamSet's own buffer) or the gradient views matching each
        parameter view in its param groups (e.g. those of :meth:`param_groups`)."""
        groups = optimizer.param_groups
        grouped = getattr(optimizer, "_grouped", len(groups) > 1)
        per_group = [self._grad_like(g["params"]) for g in groups]
        if not grouped:
            return per_group[0]
        return per_group

    def _grad_like(self, src):
        if src is self.params:
            return None
        if isinstance(src, dict):
            return {k: self._grad_view(a) for k, a in src.items()}
        if isinstance(src, (list, tuple)):
            return [self._grad_view(a) for a in src]
        return self._grad_view(src)

    def _grad_view(self, a):
        flat = self.params.flat
        ptr = _pointer(a)
        base = _pointer(flat)
        item = flat.dtype.itemsize
        off, rem = divmod(ptr - base, item)
        if (
            rem
            or off < 0
            or off + a.size > flat.size
            or a.dtype != flat.dtype
            or not a.flags.c_contiguous
        ):
            raise ValueError(
                "the optimizer holds an array that is not a contiguous view of this model's "
                "parameters; build it over model.params or model.param_groups()"
            )
        return self.params.grad_flat[off : off + a.size].reshape(a.shape)

    # -------------------------------------------------------------------------- standardization
    def fit_standardizer(self, X):
        """Fit the input standardization (x - mean) / std on ``X`` (the training set): applied
        by every later forward pass. Constant features get std 1."""
        X = self.check_X(X)
        xp = self._xp
        X64 = X.astype(np.float64)
        mean = X64.mean(axis=0)
        std = X64.std(axis=0)
        tiny = 1e-12 * xp.maximum(1.0, xp.abs(mean))
        std = xp.where(std <= tiny, 1.0, std)
        self._mean[...] = mean
        self._inv_std[...] = 1.0 / std
        return self

    def reset_standardizer(self):
        """Back to the identity (no standardization)."""
        self._mean[...] = 0.0
        self._inv_std[...] = 1.0

    # -------------------------------------------------------------------------- checks
    def check_X(self, X, what="X"):
        """``X`` as a 2-D float array of this model's width, every value finite; else a clear
        ValueError/TypeError."""
        X = self._xp.asarray(X)
        if X.dtype.kind not in "fiub":
            raise TypeError(f"{what} must hold numbers, got dtype {X.dtype}")
        if X.ndim != 2:
            raise ValueError(
                f"{what} must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}"
            )
        if X.shape[1] != self.n_features:
            raise ValueError(
                f"{what} has {X.shape[1]} features, but the model expects {self.n_features}"
            )
        if X.shape[0] == 0:
            raise ValueError(f"{what} has no samples")
        if X.dtype.kind == "f" and not _all_finite(X, self._xp):
            raise ValueError(f"{what} contains NaN or infinity")
        if X.dtype.kind != "f":
            X = X.astype(self.dtype)
        return X

    def check_targets(self, y, n=None, what="y"):
        """The targets as the loss needs them (int64 labels, or an (n, K) float array), checked:
        length ``n``, labels in [0, K), finite values, probabilities in [0, 1]."""
        xp = self._xp
        y = xp.asarray(y)
        if n is not None and y.shape[0:1] != (n,):
            raise ValueError(
                f"X and {what} have different numbers of samples: {n} and "
                f"{y.shape[0] if y.ndim else 'a scalar'}"
            )
        k = self.n_outputs
        if self.loss == "cross_entropy" and y.ndim == 1:
            if y.dtype.kind == "f":
                if not bool(xp.all(y == xp.round(y))):
                    raise ValueError(f"{what}: class labels must be integers")
            elif y.dtype.kind not in "iub":
                raise TypeError(f"{what}: class labels must be integers, got dtype {y.dtype}")
            y = y.astype(np.int64)
            if y.size and (int(y.min()) < 0 or int(y.max()) >= k):
                bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
                raise ValueError(f"{what}: label {bad} is outside [0, {k}) for a {k}-class model")
            return y
        if y.dtype.kind not in "fiub":
            raise TypeError(f"{what} must hold numbers, got dtype {y.dtype}")
        if y.ndim == 1 and k == 1:
            y = y.reshape(-1, 1)
        if y.ndim != 2 or y.shape[1] != k:
            raise ValueError(f"{what} must have shape (n, {k}), got {tuple(y.shape)}")
        y = y.astype(self.dtype)
        if not bool(xp.isfinite(y).all()):
            raise ValueError(f"{what} contains NaN or infinity")
        if self.loss in ("cross_entropy", "kl_div", "bce") and (
            bool((y < 0).any()) or bool((y > 1).any())
        ):
            raise ValueError(f"{what}: probability targets must lie in [0, 1]")
        return y

    # -------------------------------------------------------------------------- workspaces
    def workspace(self, n, train):
        """The (cached) workspace for ``n`` rows; ``train`` adds the backward buffers."""
        key = (n, bool(train))
        ws = self._workspaces.get(key)
        if ws is None:
            ws = _Workspace(self, n, train)
            self._workspaces[key] = ws
            while len(self._workspaces) > _WORKSPACES:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(key)
        return ws

    def load_batch(self, ws, X, y, idx):
        """Gather rows ``idx`` of ``X`` (standardized, cast) and of ``y`` into ``ws``; ``idx``
        int64 of length ``ws.n``. ``y`` already checked (:meth:`check_targets`) or None."""
        self._ops.gather(X, idx, self._mean, self._inv_std, True, ws.X)
        if y is None:
            return
        if y.ndim == 1:
            self._xp.take(y, idx, out=ws.labels)
        else:
            self._ops.gather(y, idx, self._mean, self._inv_std, False, ws.T)

    # -------------------------------------------------------------------------- forward/backward
    def _forward(self, ws, train, rng):
        ops, mm = self._ops, self._xp.matmul
        L = self.n_layers
        code, alpha, p = self._act_code, self._alpha, self.dropout
        drop = train and p > 0
        scale = 1.0 / (1.0 - p) if drop else 1.0
        e2 = self._e2
        x = ws.X
        for l in range(L):
            H = ws.H[l]
            mm(x, self._W[l], out=H)
            if l == L - 1:
                ops.act_forward(
                    H, self._ones[l], self._b[l], e2, ws.A[l], 0, 0.0, e2, 0.0, 1.0, False
                )
                break
            U = ws.U[l] if drop else e2
            if drop:
                _uniform(rng if rng is not None else self.rng, U, self._xp)
            if self.batch_norm:
                s, shift = ws.s[l], ws.shift[l]
                if train:
                    ops.bn_train(
                        H,
                        self._gamma[l],
                        self._beta[l],
                        self.bn_eps,
                        self.bn_momentum,
                        self._rm[l],
                        self._rv[l],
                        True,
                        ws.mean[l],
                        ws.invstd[l],
                        s,
                        shift,
                    )
                else:
                    self._bn_eval_affine(l, ws)
            else:
                s, shift = self._ones[l], self._b[l]
            ops.act_forward(H, s, shift, ws.Z[l], ws.A[l], code, alpha, U, p, scale, drop)
            x = ws.A[l]
        return ws.A[L - 1]

    def _bn_eval_affine(self, l, ws):
        xp = self._xp
        mean, invstd, s, shift = ws.mean[l], ws.invstd[l], ws.s[l], ws.shift[l]
        mean[...] = self._rm[l]
        xp.add(self._rv[l], self.dtype.type(self.bn_eps), out=invstd)
        xp.sqrt(invstd, out=invstd)
        xp.divide(self.dtype.type(1), invstd, out=invstd)
        xp.multiply(self._gamma[l], invstd, out=s)
        xp.multiply(mean, s, out=shift)
        xp.subtract(self._beta[l], shift, out=shift)

    def _loss(self, ws, targets):
        """(loss sum, stat1, stat2) over the batch in ``ws``; dLoss/dZ of the mean loss in
        ws.D[-1]. stat1/stat2: #correct and 0 (classification) or sum |err| and sum err^2."""
        ops = self._ops
        Z, D = ws.A[-1], ws.D[-1]
        n, k = Z.shape
        if self.loss == "cross_entropy" and targets == "labels":
            t, c = ops.softmax_xent(
                Z, ws.labels, self.label_smoothing, 1.0 / n, D, ws.row_loss, ws.row_correct
            )
            return t, c, 0.0
        if self.head == "softmax":
            kl = self.loss == "kl_div"
            t, c = ops.softmax_soft(Z, ws.T, kl, 1.0 / n, D, ws.row_loss, ws.row_correct)
            return t, c, 0.0
        if self.loss == "bce":
            t, c = ops.sigmoid_bce(Z, ws.T, 1.0 / (n * k), D, ws.row_loss, ws.row_correct)
            return t, c, 0.0
        return ops.regression(
            Z,
            ws.T,
            self._reg_code,
            self.huber_delta,
            1.0 / (n * k),
            D,
            ws.row_loss,
            ws.row_abs,
            ws.row_sq,
        )

    def _backward(self, ws, train=True):
        ops, mm = self._ops, self._xp.matmul
        L = self.n_layers
        code, alpha, p = self._act_code, self._alpha, self.dropout
        drop = train and p > 0
        scale = 1.0 / (1.0 - p) if drop else 1.0
        e1, e2 = self._e1, self._e2
        for l in range(L - 1, -1, -1):
            D = ws.D[l]
            if l == L - 1:
                ops.col_sums(D, self._gb[l])
            else:
                bn = self.batch_norm
                U = ws.U[l] if drop else e2
                gb = e1 if bn else self._gb[l]
                ops.act_backward(
                    ws.G[l], ws.Z[l], ws.A[l], code, alpha, U, p, scale, D, gb, drop, not bn
                )
                if bn:
                    ops.bn_backward(
                        D,
                        ws.H[l],
                        ws.mean[l],
                        ws.invstd[l],
                        self._gamma[l],
                        self._ggamma[l],
                        self._gbeta[l],
                        ws.G[l],
                        train,
                    )
                    D = ws.G[l]
            x = ws.X if l == 0 else ws.A[l - 1]
            mm(x.T, D, out=self._gW[l])
            if l > 0:
                mm(D, self._W[l].T, out=ws.G[l - 1])

    def batch_loss_and_grad(self, X, y, idx, *, train=True, rng=None):
        """One training step's forward and backward on rows ``idx`` of checked ``X``/``y``
        (see :meth:`check_X`, :meth:`check_targets`), gradients written into ``params.grads``.
        Returns (loss sum, stat1, stat2) as :meth:`_loss`. No arrays are allocated once the
        workspace for ``len(idx)`` rows exists. ``train``: batch statistics and dropout."""
        n = len(idx)
        if train and self.batch_norm and n < 2:
            raise ValueError(
                "batch norm needs more than 1 sample per batch in training mode; "
                "use a larger batch or drop_last=True"
            )
        ws = self.workspace(n, True)
        self.load_batch(ws, X, y, idx)
        self._forward(ws, train, rng)
        out = self._loss(ws, "labels" if y.ndim == 1 else "matrix")
        self._backward(ws, train)
        return out

    def batch_loss(self, X, y, idx):
        """Evaluation-mode (loss sum, stat1, stat2) of rows ``idx``; no gradients."""
        ws = self.workspace(len(idx), False)
        self.load_batch(ws, X, y, idx)
        self._forward(ws, False, None)
        return self._loss(ws, "labels" if y.ndim == 1 else "matrix")

    def loss_denominator(self, n):
        """What the summed loss is divided by for its mean over ``n`` samples."""
        return n * self.n_outputs if self.loss in ("bce", "mse", "l1", "huber") else n

    # -------------------------------------------------------------------------- public API
    def loss_and_grad(self, X, y, *, train=True, rng=None):
        """The mean loss over (X, y), with its gradient written into ``params.grads``
        (overwritten, not accumulated). ``train``: batch-norm batch statistics (and running
        statistics update) and dropout, whose masks come from ``rng`` (default ``self.rng``)."""
        X = self.check_X(X)
        y = self.check_targets(y, X.shape[0])
        idx = self._xp.arange(X.shape[0], dtype=np.int64)
        total, _, _ = self.batch_loss_and_grad(X, y, idx, train=train, rng=rng)
        return total / self.loss_denominator(X.shape[0])

    def compute_loss(self, X, y, *, train=False, rng=None):
        """The mean loss over (X, y) without touching the gradients (``train`` as in
        :meth:`loss_and_grad`; in training mode the running statistics are updated)."""
        X = self.check_X(X)
        y = self.check_targets(y, X.shape[0])
        n = X.shape[0]
        idx = self._xp.arange(n, dtype=np.int64)
        if train:
            ws = self.workspace(n, True)
            self.load_batch(ws, X, y, idx)
            self._forward(ws, True, rng)
            total = self._loss(ws, "labels" if y.ndim == 1 else "matrix")[0]
        else:
            total = self.batch_loss(X, y, idx)[0]
        return total / self.loss_denominator(n)

    def logits(self, X, *, batch_size=1024):
        """The output layer's values before the head (evaluation mode), shape (n, n_outputs)."""
        X = self.check_X(X)
        xp = self._xp
        n = X.shape[0]
        out = xp.empty((n, self.n_outputs), self.dtype)
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            idx = xp.arange(lo, hi, dtype=np.int64)
            ws = self.workspace(hi - lo, False)
            self.load_batch(ws, X, None, idx)
            out[lo:hi] = self._forward(ws, False, None)
        return out

    def predict(self, X, *, batch_size=1024):
        """Evaluation-mode outputs: class probabilities (softmax or sigmoid head) or values."""
        z = self.logits(X, batch_size=batch_size)
        xp = self._xp
        if self.head == "softmax":
            z = z - z.max(axis=1, keepdims=True)
            xp.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
        elif self.head == "sigmoid":
            e = xp.exp(-xp.abs(z))
            z = xp.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(self.dtype)
        return z

    def evaluate(self, X, y, *, batch_size=1024):
        """Evaluation-mode metrics over (X, y): ``loss`` and ``accuracy`` (classification; the
        elementwise accuracy for bce) or ``mae`` and ``rmse`` (regression)."""
        X = self.check_X(X)
        y = self.check_targets(y, X.shape[0])
        return self.evaluate_checked(X, y, batch_size=batch_size)

    def evaluate_checked(self, X, y, *, idx=None, batch_size=1024):
        """:meth:`evaluate` on already checked arrays (rows ``idx`` when given)."""
        xp = self._xp
        n = X.shape[0] if idx is None else len(idx)
        sums = [0.0, 0.0, 0.0]
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            rows = xp.arange(lo, hi, dtype=np.int64) if idx is None else idx[lo:hi]
            for i, v in enumerate(self.batch_loss(X, y, rows)):
                sums[i] += v
        return self.metrics_from_sums(sums, n)

    def metrics_from_sums(self, sums, n):
        """Turn (loss sum, stat1, stat2) over ``n`` samples into the metric dict."""
        k = self.n_outputs
        out = {"loss": sums[0] / self.loss_denominator(n)}
        if self.is_classifier:
            out["accuracy"] = sums[1] / (n * k if self.loss == "bce" else n)
        else:
            out["mae"] = sums[1] / (n * k)
            out["rmse"] = math.sqrt(sums[2] / (n * k))
        return out

    # -------------------------------------------------------------------------- state
    def arrays(self):
        """Live views name -> array of the parameters and buffers (for
        ``fastopt.checkpoint.save(params=model.arrays())`` and ``Checkpoint.restore``)."""
        out = {name: self.params[name] for name in self.params.names}
        out.update(self.buffers)
        return out

    def state_dict(self):
        """Copies of every parameter and buffer (host arrays), name -> array."""
        return {k: _to_numpy(v).copy() for k, v in self.arrays().items()}

    def load_state_dict(self, state):
        """Copy a :meth:`state_dict` back in (names and shapes checked before any write)."""
        mine = self.arrays()
        missing = sorted(set(mine) - set(state))
        extra = sorted(set(state) - set(mine))
        if missing or extra:
            raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {extra}")
        for k, v in state.items():
            if tuple(np.shape(v)) != tuple(mine[k].shape):
                raise ValueError(
                    f"state_dict[{k!r}] has shape {np.shape(v)}, the model {tuple(mine[k].shape)}"
                )
        for k, v in state.items():
            mine[k][...] = self._xp.asarray(v).astype(mine[k].dtype)

    def astype(self, dtype):
        """A copy of the model (parameters, buffers, dropout RNG state) in ``dtype``."""
        config = dict(self._config, dtype=np.dtype(dtype).name, init="zeros")
        other = MLP(**config)
        other.load_state_dict(self.state_dict())
        other.rng.bit_generator.state = self.rng.bit_generator.state
        return other

    def get_config(self):
        """The constructor arguments (``MLP(**model.get_config())`` builds the same layout)."""
        return dict(self._config)

    def __getstate__(self):
        # the values are in "state": no need to pickle (or rerun) a callable initializer
        config = dict(self._config, init="zeros")
        return {"config": config, "state": self.state_dict(), "rng": self.rng}

    def __setstate__(self, d):
        self.__init__(**d["config"])
        self.load_state_dict(d["state"])
        self.rng = d["rng"]


# ------------------------------------------------------------------------------ helpers


def _array_module(device):
    if device == "cpu":
        return np
    if isinstance(device, str) and device.partition(":")[0] == "cuda":
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError(
                f"MLP(device={device!r}) needs CuPy, which is not installed"
            ) from exc
        return cupy  # pragma: no cover - needs CuPy
    raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:<index>'")


def _all_finite(X, xp):
    if xp is np and X.size and X.dtype in (np.float32, np.float64):
        from .kernels.nn_cpu import all_finite

        return bool(all_finite(X))
    return bool(xp.isfinite(X).all())


def _uniform(rng, U, xp):
    if xp is np:
        rng.random(out=U.reshape(-1), dtype=U.dtype)
    else:  # pragma: no cover - needs CuPy: host draw, one copy
        U[...] = xp.asarray(rng.random(U.shape, dtype=U.dtype))


def _own_view(flat, lo, hi):
    """``flat[lo:hi]`` as an array of its own (not a view sharing ``flat``'s base object): the
    optimizers refuse two param groups over views of one NumPy base, even disjoint ones."""
    if isinstance(flat, np.ndarray):
        return np.frombuffer(flat[lo:hi].data, dtype=flat.dtype)
    return flat[lo:hi]  # pragma: no cover - CuPy: groups are told apart by data pointer


def _pointer(a):
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr  # pragma: no cover - CuPy


def _to_numpy(a):
    if isinstance(a, np.ndarray):
        return a
    return a.get()  # pragma: no cover - CuPy


def _posint(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _real(name, v, *, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite real number, got {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")
    return v
