"""The array operations an :class:`fastopt.nn.MLP` runs on, in two interchangeable backends.

:class:`NumbaOps` calls the fused Numba CPU kernels of ``fastopt.kernels.nn_cpu`` (one pass per
layer, no allocation); :class:`ArrayOps` writes the same operations as whole-array expressions of
an array module (NumPy or CuPy): the GPU path and, with NumPy, the readable reference the
kernels are tested against. Both take the same arguments and write the same output arrays;
activations come as :class:`fastopt.nn.activations.Activation` definitions.
"""

from __future__ import annotations

import numpy as np

from ..kernels.nn_cpu import L1, MSE

__all__ = ["ArrayOps", "NumbaOps", "make_ops", "uniform"]


class NumbaOps:
    """The fused Numba CPU kernels (``fastopt.kernels.nn_cpu``)."""

    name = "numba"

    def __init__(self, parallel_threshold=None, parallel=True):
        from ..kernels import nn_cpu

        self.k = nn_cpu
        self.threshold = parallel_threshold
        self.parallel = parallel

    def _pick(self, kernel, elements):
        if not self.parallel:
            return kernel.serial
        return self.k.pick(kernel, elements, self.threshold)

    def act_forward(self, H, s, b, Z, A, act, alpha, U, p, scale, drop):
        self._pick(self.k.act_forward, A.size)(H, s, b, Z, A, act.code, alpha, U, p, scale, drop)

    def act_backward(self, G, Z, A, act, alpha, U, p, scale, D, db, drop, has_bias):
        self._pick(self.k.act_backward, D.size)(
            G, Z, A, act.code, alpha, U, p, scale, D, db, drop, has_bias
        )

    def col_sums(self, D, out):
        self._pick(self.k.col_sums, D.size)(D, out)

    def softmax_xent(self, Z, y, smoothing, scale, D, row_loss, row_correct):
        return self._pick(self.k.softmax_xent, Z.size)(
            Z, y, smoothing, scale, D, row_loss, row_correct
        )

    def softmax_soft(self, Z, T, kl, smoothing, scale, D, row_loss, row_correct):
        return self._pick(self.k.softmax_soft, Z.size)(
            Z, T, kl, smoothing, scale, D, row_loss, row_correct
        )

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


class ArrayOps:
    """The same operations as whole-array expressions of an array module ``xp`` (NumPy or CuPy):
    the GPU path and, with NumPy, the readable reference the Numba kernels are tested against.
    Allocates temporaries (unlike the kernels)."""

    name = "array"

    def __init__(self, xp):
        self.xp = xp

    def act_forward(self, H, s, b, Z, A, act, alpha, U, p, scale, drop):
        v = H * s + b
        if act.name == "gelu":
            Z[...] = v
        a = act.forward(self.xp, v, alpha)
        if drop:
            a = self.xp.where(U >= U.dtype.type(p), a * a.dtype.type(scale), a.dtype.type(0))
        A[...] = a

    def act_backward(self, G, Z, A, act, alpha, U, p, scale, D, db, drop, has_bias):
        inv = (1.0 - p) if drop else 1.0
        d = G * act.derivative(self.xp, Z, A, alpha, inv)
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
        # nonnegative float64 terms (max - z_label) + log(sum), as the kernel: no cancellation
        mx64 = mx.astype(np.float64)
        gap = mx64[:, 0] - Z[rows, y].astype(np.float64)
        logs = xp.log(s[:, 0].astype(np.float64))
        if smoothing == 0.0:
            row_loss[...] = gap + logs
        else:
            gaps = (mx64 - Z.astype(np.float64)).sum(axis=1)
            row_loss[...] = (1.0 - smoothing) * gap + smoothing / k * gaps + logs
        row_correct[...] = Z.argmax(axis=1) == y
        t = Z.dtype.type
        g = (e / s - t(smoothing / k)) * t(scale)
        g[rows, y] -= t(1 - smoothing) * t(scale)
        D[...] = g
        return float(row_loss.sum()), int(row_correct.sum())

    def softmax_soft(self, Z, T, kl, smoothing, scale, D, row_loss, row_correct):
        xp = self.xp
        k = Z.shape[1]
        t = Z.dtype.type
        mx = Z.max(axis=1, keepdims=True)
        e = xp.exp(Z - mx)
        s = e.sum(axis=1, keepdims=True)
        # -log p = (max - z) + log(sum) in float64, two nonnegative terms (as the kernel)
        neg_logp = (mx.astype(np.float64) - Z.astype(np.float64)) + xp.log(s.astype(np.float64))
        q = T * t(1.0 - smoothing) + t(smoothing / k)  # the smoothed targets (T itself at 0)
        q64 = T.astype(np.float64) * (1.0 - smoothing) + smoothing / k
        loss = (q64 * neg_logp).sum(axis=1)
        if kl:
            safe = xp.where(q64 > 0, q64, 1.0)
            loss = loss + (q64 * xp.log(safe)).sum(axis=1)
        row_loss[...] = loss
        row_correct[...] = Z.argmax(axis=1) == T.argmax(axis=1)
        D[...] = (e / s * q.sum(axis=1, keepdims=True) - q) * t(scale)
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


def make_ops(backend, xp, *, parallel=False):
    """The ops for ``backend`` (``"numba"``, ``"array"`` or None: numba on the CPU, array on a
    GPU) over array module ``xp``."""
    if backend is None:
        backend = "numba" if xp is np else "array"
    if backend == "numba":
        if xp is not np:
            raise ValueError("backend='numba' runs on the CPU; use backend='array' on a GPU")
        return NumbaOps(parallel=parallel)
    if backend == "array":
        return ArrayOps(xp)
    raise ValueError(f"unknown backend {backend!r}; expected 'numba' or 'array'")


def uniform(rng, U, xp):
    """Fill ``U`` with uniforms in [0, 1) from NumPy generator ``rng`` (the dropout draws)."""
    if xp is np:
        rng.random(out=U.reshape(-1), dtype=U.dtype)
    else:  # pragma: no cover - needs CuPy: host draw, one copy
        U[...] = xp.asarray(rng.random(U.shape, dtype=U.dtype))
