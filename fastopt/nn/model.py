"""The :class:`MLP`: a multilayer perceptron whose weights and biases live in one ParamSet.

Layers: ``Linear -> [BatchNorm] -> activation -> [Dropout]`` for every hidden layer, then a
linear output layer whose *head* is fixed by the loss (:mod:`fastopt.nn.losses`). Forward and
backward are hand written: the matrix products go to BLAS through the array module's ``matmul``,
everything elementwise to the array ops (:mod:`fastopt.nn.ops`). Weights are stored
(fan_in, fan_out) so that ``Z = X @ W``. Backward writes the gradients straight into
``params.grads`` (overwriting them) and a step allocates no arrays: every intermediate lives in
a workspace preallocated per batch size (:mod:`fastopt.nn.workspace`). Because backward
overwrites them, ``params`` is declared to :func:`fastopt.accumulate.mark_grads_overwritten`:
a :class:`fastopt.GradientAccumulator` over ``model.params`` keeps its sum in a buffer of its
own, so ``model.loss_and_grad(Xb, yb); acc.add()`` per micro-batch steps on their mean gradient.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..accumulate import mark_grads_overwritten
from ..arrays import array_module, to_host
from ..paramset import ParamSet
from ..validation import check_choice, check_int, check_real
from . import groups, losses
from .activations import ACTIVATIONS
from .data import check_features, check_targets
from .init import INITIALIZERS, auto_initializer, gain, initialize
from .losses import LOSSES
from .ops import make_ops, uniform
from .workspace import WorkspaceCache

__all__ = ["MLP"]

IDENTITY = ACTIVATIONS["identity"]
"""The output layer's activation (the head is applied by the loss)."""


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
        n_features = check_int("n_features", n_features, lo=1)
        n_outputs = check_int("n_outputs", n_outputs, lo=1)
        if isinstance(hidden_sizes, numbers.Integral) and not isinstance(hidden_sizes, bool):
            hidden_sizes = (hidden_sizes,)
        try:
            hidden_sizes = tuple(hidden_sizes)
        except TypeError:
            raise TypeError(
                f"hidden_sizes must be a sequence of positive ints, got {hidden_sizes!r}"
            ) from None
        hidden_sizes = tuple(
            check_int(f"hidden_sizes[{i}]", h, lo=1) for i, h in enumerate(hidden_sizes)
        )
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("loss", loss, LOSSES)
        if not callable(init):
            check_choice("init", init, INITIALIZERS)
        if not isinstance(batch_norm, (bool, np.bool_)):
            raise TypeError(f"batch_norm must be a bool, got {batch_norm!r}")
        dropout = check_real("dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        label_smoothing = check_real("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
        if label_smoothing and loss != "cross_entropy":
            raise ValueError("label_smoothing applies to loss='cross_entropy' only")
        huber_delta = check_real("huber_delta", huber_delta, lo=0.0, lo_open=True)
        negative_slope = check_real("negative_slope", negative_slope, lo=0.0)
        elu_alpha = check_real("elu_alpha", elu_alpha, lo=0.0, lo_open=True)
        bn_momentum = check_real("bn_momentum", bn_momentum, lo=0.0, hi=1.0)
        bn_eps = check_real("bn_eps", bn_eps, lo=0.0, lo_open=True)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        fewest = LOSSES[loss].min_outputs
        if n_outputs < fewest:
            raise ValueError(f"loss={loss!r} needs n_outputs >= {fewest} classes, got {n_outputs}")

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
        self._loss_def = LOSSES[loss]
        self.head = self._loss_def.head
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
        self._act = ACTIVATIONS[activation]
        self._alpha = negative_slope if activation == "leaky_relu" else elu_alpha

        self._xp = xp = array_module(device, owner="MLP")[0]
        self._ops = make_ops(backend, xp, parallel=bool(parallel_kernels))

        rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng(rng.integers(2**63))
        """Generator of the dropout masks when no ``rng`` is passed (seeded from ``seed``)."""
        self.params = ParamSet(self._initial_params(init, rng), dtype=dtype, device=device)
        mark_grads_overwritten(self.params)  # backward overwrites params.grads (see the module)
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
                g = gain(self.activation, negative_slope=self.negative_slope) if hidden else 1.0
                name = auto_initializer(self.activation, hidden) if init == "auto" else init
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
        self._workspaces = WorkspaceCache(self)

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
        """Whether the loss is a classification loss (metric: accuracy; else MAE and RMSE)."""
        return self._loss_def.classification

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
    def param_groups(self, weight_decay=0.0, per_tensor=False, **overrides):
        """Two optimizer param groups over views of ``params``: the weights with
        ``weight_decay``, everything else (biases, batch-norm scales and shifts) without; with
        ``per_tensor``, a view per parameter tensor (for rules that are not ``elementwise``:
        :func:`fastopt.nn.groups.decay_groups`). Step with ``opt.step(model.grads_for(opt))``."""
        return groups.decay_groups(
            self.params, self.n_weights, weight_decay, per_tensor, **overrides
        )

    def grads_for(self, optimizer):
        """The ``grads`` argument of ``optimizer.step`` for an optimizer over this model's
        parameters: ``None`` (the ParamSet's own buffer) or the gradient views matching each
        parameter view in its param groups (e.g. those of :meth:`param_groups`)."""
        return groups.grads_for(self.params, optimizer)

    # -------------------------------------------------------------------------- standardization
    def fit_standardizer(self, X):
        """Fit the input standardization (x - mean) / std on ``X`` (the training set): applied
        by every later forward pass. Constant features get std 1."""
        X = self.check_X(X)  # integers come as float64: their low bits are kept
        xp = self._xp
        X64 = X.astype(np.float64, copy=False)
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
        return check_features(X, self._xp, self.n_features, self.dtype, what)

    def check_targets(self, y, n=None, what="y"):
        """The targets as the loss needs them (int64 labels, or an (n, K) float array), checked:
        length ``n``, labels in [0, K), finite values, probabilities in [0, 1]."""
        return check_targets(y, self._xp, self._loss_def, self.n_outputs, self.dtype, n, what)

    # -------------------------------------------------------------------------- workspaces
    def workspace(self, n, train):
        """The (cached) workspace for ``n`` rows; ``train`` adds the backward buffers."""
        return self._workspaces.get(n, train)

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
        act, alpha, p = self._act, self._alpha, self.dropout
        drop = train and p > 0
        scale = 1.0 / (1.0 - p) if drop else 1.0
        e2 = self._e2
        x = ws.X
        for l in range(L):
            H = ws.H[l]
            mm(x, self._W[l], out=H)
            if l == L - 1:
                ops.act_forward(
                    H, self._ones[l], self._b[l], e2, ws.A[l], IDENTITY, 0.0, e2, 0.0, 1.0, False
                )
                break
            U = ws.U[l] if drop else e2
            if drop:
                uniform(rng if rng is not None else self.rng, U, self._xp)
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
            ops.act_forward(H, s, shift, ws.Z[l], ws.A[l], act, alpha, U, p, scale, drop)
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
        """(loss sum, stat1, stat2) over the batch in ``ws`` (see :func:`losses.batch_loss`);
        dLoss/dZ of the mean loss in ws.D[-1]."""
        return losses.batch_loss(
            self._loss_def,
            self._ops,
            ws.A[-1],
            ws.D[-1],
            ws,
            labels=targets == "labels",
            label_smoothing=self.label_smoothing,
            huber_delta=self.huber_delta,
        )

    def _backward(self, ws, train=True):
        ops, mm = self._ops, self._xp.matmul
        L = self.n_layers
        act, alpha, p = self._act, self._alpha, self.dropout
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
                    ws.G[l], ws.Z[l], ws.A[l], act, alpha, U, p, scale, D, gb, drop, not bn
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
        self._check_train_batch(n, train)
        ws = self.workspace(n, True)
        self.load_batch(ws, X, y, idx)
        self._forward(ws, train, rng)
        out = self._loss(ws, "labels" if y.ndim == 1 else "matrix")
        self._backward(ws, train)
        return out

    def _check_train_batch(self, n, train):
        """Batch norm in training mode needs 2 rows or more (the variance of one row is 0 and
        its running-variance update has no n/(n-1) correction); torch's BatchNorm1d refuses it
        too. Checked before anything (running statistics, gradients) is written."""
        if train and self.batch_norm and n < 2:
            raise ValueError(
                f"batch norm needs more than 1 sample per batch in training mode, got {n}; "
                "use a larger batch (or train=False)"
            )

    def batch_loss(self, X, y, idx):
        """Evaluation-mode (loss sum, stat1, stat2) of rows ``idx``; no gradients."""
        ws = self.workspace(len(idx), False)
        self.load_batch(ws, X, y, idx)
        self._forward(ws, False, None)
        return self._loss(ws, "labels" if y.ndim == 1 else "matrix")

    def loss_denominator(self, n):
        """What the summed loss is divided by for its mean over ``n`` samples."""
        return losses.denominator(self._loss_def, n, self.n_outputs)

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
        self._check_train_batch(n, train)
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
        """The output layer's values before the head (evaluation mode), shape (n, n_outputs),
        computed ``batch_size`` rows at a time."""
        batch_size = check_int("batch_size", batch_size, lo=1)
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
        z = self.logits(X, batch_size=batch_size)  # checks batch_size first
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
        batch_size = check_int("batch_size", batch_size, lo=1)
        X = self.check_X(X)
        y = self.check_targets(y, X.shape[0])
        return self.evaluate_checked(X, y, batch_size=batch_size)

    def evaluate_checked(self, X, y, *, idx=None, batch_size=1024):
        """:meth:`evaluate` on already checked arrays (rows ``idx`` when given)."""
        batch_size = check_int("batch_size", batch_size, lo=1)
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
            out["accuracy"] = sums[1] / (n * k if self._loss_def.per_element else n)
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
        return {k: np.array(to_host(v)) for k, v in self.arrays().items()}

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
