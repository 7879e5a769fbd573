"""CPU kernels of ``fastopt.nn``: the elementwise and row/column-reduction parts of an MLP.

The matrix products go to NumPy's BLAS; everything around them is fused here, one pass each:

``act_forward``      A <- act(H * s + b) [* dropout mask] (s, b per column)
``act_backward``     D <- G * mask * act'(.), db <- column sums of D
``col_sums``         column sums (the output layer's bias gradient)
``softmax_xent``     softmax + cross-entropy (label smoothing) -> loss, #correct, dLoss/dZ
``softmax_soft``     softmax + cross-entropy (label smoothing) / KL divergence, soft targets
``sigmoid_bce``      sigmoid + binary cross-entropy (logits) -> loss, #correct, dLoss/dZ
``regression``       MSE / L1 / Huber -> loss, sum |err|, sum err^2, dLoss/dZ
``bn_train``         batch-norm batch statistics, running statistics, folded scale/shift
``bn_backward``      batch-norm backward -> dgamma, dbeta, dLoss/dH (batch or running stats)
``gather_rows``      minibatch rows X[idx] (cast, optionally standardized) into a workspace

Every kernel exists twice: ``<name>.parallel`` (``prange`` over rows or column blocks) and
``<name>.serial`` (same code, one thread), picked by size in :func:`pick`. ``fastopt.nn`` runs the
serial ones unless asked (``MLP(parallel_kernels=True)``): a training step alternates these
kernels with multithreaded BLAS calls, and a Numba thread pool launched between two BLAS calls
fights the BLAS worker threads, which keep spinning for a while after each call. Measured on 2
cores (784-256-256-10, Adam): parallel kernels made an epoch 5 to 10 times slower (batch 512:
5.0 s instead of 0.51 s), while the serial kernels take a few microseconds per layer. Both
variants give bit-identical results: every output element is computed by the same arithmetic in the
same order, and every reduction (column sums, the loss sum) runs in a fixed order (rows in order,
per column; per-row values summed in row order) whatever the number of threads.

Constants are built with ``t = X.dtype.type`` so float32 arithmetic stays float32 (a Python float
literal would promote it to float64). Column-block loops use unsigned ranges
(``range(uint64(lo), uint64(hi))``) so Numba does not emit negative-index wraparound, which would
block vectorization.
"""

import math
import types

import numpy as np
from numba import njit, prange, uint64

IDENTITY, RELU, LEAKY_RELU, ELU, GELU, TANH, SIGMOID = range(7)
"""Activation codes (``fastopt.nn.ACTIVATIONS`` maps the names to them)."""
MSE, L1, HUBER = range(3)
"""Regression loss codes (``fastopt.nn.LOSSES`` maps the names to them)."""

COL_BLOCK = 64
"""Columns per block in the column-parallel kernels (a block's rows are summed in order)."""
PARALLEL_MIN_ELEMENTS = 1 << 17
"""With parallel kernels enabled, arrays smaller than this still run the serial variant (a
parallel launch costs ~10 µs)."""

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# ------------------------------------------------------------------------------------ helpers


@njit(inline="always", cache=True, nogil=True, error_model="numpy")
def _activation_constants(X, alpha, U, p, scale):
    """0, 1, 1/2, alpha, the dropout threshold p and the dropout scale in the dtype of X (p in
    U's): the constants of the activation kernels."""
    t = X.dtype.type
    return t(0.0), t(1.0), t(0.5), t(alpha), U.dtype.type(p), t(scale)


@njit(inline="always", cache=True, nogil=True, error_model="numpy")
def _n_blocks(m):
    """How many column blocks of :data:`COL_BLOCK` columns cover ``m`` columns."""
    return (m + COL_BLOCK - 1) // COL_BLOCK


@njit(inline="always", cache=True, nogil=True, error_model="numpy")
def _block(blk, m):
    """(first, end) column of block ``blk`` of ``m`` columns."""
    lo = blk * COL_BLOCK
    return lo, min(lo + COL_BLOCK, m)


# ------------------------------------------------------------------------------------ forward


def _act_forward(H, s, b, Z, A, code, alpha, U, p, scale, drop):
    """A[i, j] = act(H[i, j] * s[j] + b[j]) (s = ones for a plain bias, the folded batch norm
    otherwise), times the inverted-dropout mask (U >= p) * scale when ``drop``. GELU also stores
    its pre-activation in Z (its derivative needs it); the others are differentiated from A.
    H, Z and A must be distinct arrays (aliasing would block vectorization)."""
    t = A.dtype.type
    zero, one, half, al, pp, sc = _activation_constants(A, alpha, U, p, scale)
    sqrt_half = t(_SQRT_HALF)
    n, m = A.shape
    for i in prange(n):
        h = H[i]
        a = A[i]
        if code == IDENTITY:
            for j in range(uint64(0), uint64(m)):
                a[j] = h[j] * s[j] + b[j]
        elif code == RELU:
            for j in range(uint64(0), uint64(m)):
                v = h[j] * s[j] + b[j]
                a[j] = zero if v < zero else v
        elif code == LEAKY_RELU:
            for j in range(uint64(0), uint64(m)):
                v = h[j] * s[j] + b[j]
                a[j] = v * al if v < zero else v
        elif code == ELU:
            for j in range(uint64(0), uint64(m)):
                v = h[j] * s[j] + b[j]
                a[j] = al * math.expm1(v) if v < zero else v
        elif code == GELU:
            z = Z[i]
            for j in range(uint64(0), uint64(m)):
                v = h[j] * s[j] + b[j]
                z[j] = v
                a[j] = half * v * (one + math.erf(v * sqrt_half))
        elif code == TANH:
            for j in range(uint64(0), uint64(m)):
                a[j] = math.tanh(h[j] * s[j] + b[j])
        else:  # SIGMOID
            for j in range(uint64(0), uint64(m)):
                v = h[j] * s[j] + b[j]
                e = math.exp(-abs(v))
                a[j] = one / (one + e) if v >= zero else e / (one + e)
        if drop:
            u = U[i]
            for j in range(uint64(0), uint64(m)):
                a[j] = a[j] * sc if u[j] >= pp else zero


# ------------------------------------------------------------------------------------ backward


def _act_backward(G, Z, A, code, alpha, U, p, scale, D, db, drop, has_bias):
    """D = G * mask * act'(.), and db[j] = sum_i D[i, j] when ``has_bias``. D must not be G.

    The derivative is taken from the output A (relu, leaky_relu, elu, tanh, sigmoid; A divided
    by the dropout scale where the unit was kept; dropped units get 0 anyway) or from Z (gelu).
    Column blocks in parallel, rows in order inside a block: the column sums are deterministic."""
    t = D.dtype.type
    zero, one, half, al, pp, sc = _activation_constants(D, alpha, U, p, scale)
    inv = t(1.0 - p) if drop else one
    sqrt_half = t(_SQRT_HALF)
    inv_sqrt_2pi = t(_INV_SQRT_2PI)
    n, m = D.shape
    for blk in prange(_n_blocks(m)):
        lo, hi = _block(blk, m)
        if has_bias:
            for j in range(uint64(lo), uint64(hi)):
                db[j] = zero
        for i in range(n):
            g = G[i]
            d = D[i]
            a = A[i]
            if code == IDENTITY:
                for j in range(uint64(lo), uint64(hi)):
                    d[j] = g[j]
            elif code == RELU:
                for j in range(uint64(lo), uint64(hi)):
                    d[j] = g[j] if a[j] > zero else zero
            elif code == LEAKY_RELU:
                for j in range(uint64(lo), uint64(hi)):
                    d[j] = g[j] if a[j] > zero else g[j] * al
            elif code == ELU:
                for j in range(uint64(lo), uint64(hi)):
                    v = a[j] * inv
                    d[j] = g[j] if v > zero else g[j] * (v + al)
            elif code == GELU:
                z = Z[i]
                for j in range(uint64(lo), uint64(hi)):
                    v = z[j]
                    cdf = half * (one + math.erf(v * sqrt_half))
                    pdf = inv_sqrt_2pi * math.exp(-half * v * v)
                    d[j] = g[j] * (cdf + v * pdf)
            elif code == TANH:
                for j in range(uint64(lo), uint64(hi)):
                    v = a[j] * inv
                    d[j] = g[j] * (one - v * v)
            else:  # SIGMOID
                for j in range(uint64(lo), uint64(hi)):
                    v = a[j] * inv
                    d[j] = g[j] * (v * (one - v))
            if drop:
                u = U[i]
                for j in range(uint64(lo), uint64(hi)):
                    d[j] = d[j] * sc if u[j] >= pp else zero
            if has_bias:
                for j in range(uint64(lo), uint64(hi)):
                    db[j] += d[j]


def _col_sums(D, out):
    """out[j] = sum_i D[i, j], rows in order (deterministic)."""
    t = out.dtype.type
    n, m = D.shape
    for blk in prange(_n_blocks(m)):
        lo, hi = _block(blk, m)
        for j in range(uint64(lo), uint64(hi)):
            out[j] = t(0.0)
        for i in range(n):
            d = D[i]
            for j in range(uint64(lo), uint64(hi)):
                out[j] += d[j]


# ------------------------------------------------------------------------------------ losses


@njit(inline="always", cache=True, nogil=True, error_model="numpy")
def _max_argmax(x):
    """(max, index of its first occurrence) of a 1-D row."""
    mx = x[0]
    am = 0
    for j in range(1, x.size):
        if x[j] > mx:
            mx = x[j]
            am = j
    return mx, am


@njit(inline="always", cache=True, nogil=True, error_model="numpy")
def _exp_shifted(z, mx, out):
    """out = exp(z - mx); returns the sum of out (the softmax denominator)."""
    s = z.dtype.type(0.0)
    for j in range(z.size):
        e = math.exp(z[j] - mx)
        out[j] = e
        s += e
    return s


@njit(inline="always", cache=True, nogil=True, error_model="numpy")
def _totals(row_loss, row_correct):
    """(sum of the row losses, sum of the row counts), in row order."""
    total = 0.0
    correct = 0
    for i in range(row_loss.size):
        total += row_loss[i]
        correct += row_correct[i]
    return total, correct


def _softmax_xent(Z, y, smoothing, scale, D, row_loss, row_correct):
    """Softmax + cross-entropy against integer labels ``y`` with label smoothing ``smoothing``
    (target (1-eps)·onehot + eps/K, torch's ``CrossEntropyLoss(label_smoothing=eps)``).

    row_loss[i] = logsumexp(z) - sum_k q_k z_k (float64); D = (softmax(z) - q) * scale; returns
    (sum of row losses, number of rows whose argmax is the label). D and Z are distinct arrays.

    The loss is summed from nonnegative float64 terms, never as the difference lse - z_label of
    two numbers of the logits' size: (max - z_label) + log(sum exp(z - max)), with smoothing
    (1-eps)·(max - z_label) + eps/K·sum_k (max - z_k) + log(sum). A confident float32 row (loss
    1e-5 at logits ~100) then keeps its relative accuracy instead of half an ulp of the logit."""
    t = Z.dtype.type
    n, k = Z.shape
    off = t(smoothing / k)
    on = t(1.0 - smoothing)
    on64 = 1.0 - smoothing
    off64 = smoothing / k
    sc = t(scale)
    for i in prange(n):
        z = Z[i]
        d = D[i]
        label = y[i]
        mx, am = _max_argmax(z)
        mx64 = np.float64(mx)
        s = _exp_shifted(z, mx, d)
        gap = mx64 - np.float64(z[label])
        if smoothing == 0.0:
            row_loss[i] = gap + math.log(np.float64(s))
        else:
            gaps = 0.0
            for j in range(k):
                gaps += mx64 - np.float64(z[j])
            row_loss[i] = on64 * gap + off64 * gaps + math.log(np.float64(s))
        r = t(1.0) / s
        for j in range(k):
            d[j] = (d[j] * r - off) * sc
        d[label] -= on * sc
        row_correct[i] = 1 if am == label else 0
    return _totals(row_loss, row_correct)


def _softmax_soft(Z, T, kl, smoothing, scale, D, row_loss, row_correct):
    """Softmax against soft targets T (rows of probabilities): cross-entropy
    -sum_k q_k log p_k with q = (1-eps)·t + eps/K (label smoothing ``smoothing``, as torch's
    ``cross_entropy(z, t, label_smoothing=eps)`` smooths probability targets), or with ``kl``
    the KL divergence sum_k t_k (log t_k - log p_k) (torch ``KLDivLoss(log_softmax(z), t)``;
    0·log 0 = 0; no smoothing). D = (p·sum_k q_k - q) * scale. Correct: argmax z == argmax t.
    D and Z are distinct arrays. -log p_k is summed as (max - z_k) + log(sum exp(z - max)) in
    float64, two nonnegative terms (see :func:`_softmax_xent`)."""
    t = Z.dtype.type
    n, k = Z.shape
    sc = t(scale)
    zero = t(0.0)
    off = t(smoothing / k)
    on = t(1.0 - smoothing)
    on64 = 1.0 - smoothing
    off64 = smoothing / k
    for i in prange(n):
        z = Z[i]
        d = D[i]
        tr = T[i]
        mx, am = _max_argmax(z)
        at = _max_argmax(tr)[1]
        s = _exp_shifted(z, mx, d)
        mx64 = np.float64(mx)
        logs = math.log(np.float64(s))
        loss = 0.0
        qsum = t(0.0)
        for j in range(k):
            tj = tr[j]
            qj = on * tj + off  # tj itself without smoothing
            qsum += qj
            if qj != zero:
                q64 = on64 * np.float64(tj) + off64
                loss += q64 * ((mx64 - np.float64(z[j])) + logs)
                if kl:
                    loss += q64 * math.log(q64)
        row_loss[i] = loss
        r = t(1.0) / s
        for j in range(k):
            d[j] = (d[j] * r * qsum - (on * tr[j] + off)) * sc
        row_correct[i] = 1 if am == at else 0
    return _totals(row_loss, row_correct)


def _sigmoid_bce(Z, T, scale, D, row_loss, row_correct):
    """Sigmoid + binary cross-entropy on logits (torch ``BCEWithLogitsLoss``):
    max(z,0) - z·t + log1p(exp(-|z|)), D = (sigmoid(z) - t) * scale. row_correct counts the
    elements with (z > 0) == (t >= 0.5). D and Z are distinct arrays."""
    t = Z.dtype.type
    n, k = Z.shape
    sc = t(scale)
    zero = t(0.0)
    one = t(1.0)
    half = t(0.5)
    for i in prange(n):
        z = Z[i]
        d = D[i]
        tr = T[i]
        loss = 0.0
        c = 0
        for j in range(k):
            v = z[j]
            tj = tr[j]
            e = math.exp(-abs(v))
            loss += np.float64(max(v, zero) - v * tj + math.log1p(e))
            sig = one / (one + e) if v >= zero else e / (one + e)
            d[j] = (sig - tj) * sc
            if (v > zero) == (tj >= half):
                c += 1
        row_loss[i] = loss
        row_correct[i] = c
    return _totals(row_loss, row_correct)


def _regression(Z, T, kind, delta, scale, D, row_loss, row_abs, row_sq):
    """MSE (z-t)^2, L1 |z-t| or Huber (0.5 e^2 for |e| <= delta, else delta(|e| - delta/2)),
    torch's elementwise definitions; D = dloss/dz * scale. Returns (sum loss, sum |e|, sum e^2),
    each summed per row then over rows in order. D and Z are distinct arrays."""
    t = Z.dtype.type
    n, k = Z.shape
    sc = t(scale)
    two = t(2.0)
    half = t(0.5)
    zero = t(0.0)
    dl = t(delta)
    for i in prange(n):
        z = Z[i]
        d = D[i]
        tr = T[i]
        loss = 0.0
        ab = 0.0
        sq = 0.0
        for j in range(k):
            e = z[j] - tr[j]
            ae = abs(e)
            ab += np.float64(ae)
            sq += np.float64(e) * np.float64(e)
            if kind == MSE:
                loss += np.float64(e) * np.float64(e)
                d[j] = two * e * sc
            elif kind == L1:
                loss += np.float64(ae)
                d[j] = (sc if e > zero else (-sc if e < zero else zero)) if e == e else e
            else:
                if ae <= dl:
                    loss += np.float64(half * e * e)
                    d[j] = e * sc
                else:
                    loss += np.float64(dl * (ae - half * dl))
                    d[j] = (dl if e > zero else -dl) * sc
        row_loss[i] = loss
        row_abs[i] = ab
        row_sq[i] = sq
    total = 0.0
    tab = 0.0
    tsq = 0.0
    for i in range(n):
        total += row_loss[i]
        tab += row_abs[i]
        tsq += row_sq[i]
    return total, tab, tsq


# ------------------------------------------------------------------------------------ batch norm


def _bn_train(H, gamma, beta, eps, momentum, running_mean, running_var, update, mean, invstd, s, b):
    """Batch statistics of the columns of H (two passes, float64 sums, biased variance), the
    running statistics update (torch: unbiased variance, ``momentum`` weight on the batch value)
    and the folded affine map: s = gamma·invstd, b = beta - mean·s, so that the normalized
    output is H·s + b."""
    t = H.dtype.type
    n, m = H.shape
    unbias = n / (n - 1.0) if n > 1 else 1.0
    for blk in prange(_n_blocks(m)):
        lo, hi = _block(blk, m)
        acc = np.zeros(COL_BLOCK)
        for i in range(n):
            h = H[i]
            for j in range(uint64(lo), uint64(hi)):
                acc[j - lo] += np.float64(h[j])
        for j in range(lo, hi):
            mean[j] = t(acc[j - lo] / n)
            acc[j - lo] = 0.0
        for i in range(n):
            h = H[i]
            for j in range(uint64(lo), uint64(hi)):
                c = np.float64(h[j] - mean[j])
                acc[j - lo] += c * c
        for j in range(lo, hi):
            var = acc[j - lo] / n
            invstd[j] = t(1.0 / math.sqrt(var + eps))
            s[j] = gamma[j] * invstd[j]
            b[j] = beta[j] - mean[j] * s[j]
            if update:
                running_mean[j] = t((1.0 - momentum) * running_mean[j] + momentum * mean[j])
                running_var[j] = t((1.0 - momentum) * running_var[j] + momentum * var * unbias)


def _bn_backward(G, H, mean, invstd, gamma, dgamma, dbeta, DH, batch_stats):
    """Backward of y = gamma·xhat + beta, xhat = (h - mean)·invstd, batch statistics:
    dbeta = sum g, dgamma = sum g·xhat, dh = gamma·invstd/n·(n·g - dbeta - xhat·dgamma).
    Without ``batch_stats`` (evaluation mode: mean and invstd are the running statistics,
    constants) dh = gamma·invstd·g. Column blocks in parallel, float64 sums in row order.
    DH must not be G."""
    t = G.dtype.type
    n, m = G.shape
    for blk in prange(_n_blocks(m)):
        lo, hi = _block(blk, m)
        sg = np.zeros(COL_BLOCK)
        sgx = np.zeros(COL_BLOCK)
        for i in range(n):
            g = G[i]
            h = H[i]
            for j in range(uint64(lo), uint64(hi)):
                xh = (h[j] - mean[j]) * invstd[j]
                sg[j - lo] += np.float64(g[j])
                sgx[j - lo] += np.float64(g[j] * xh)
        for j in range(lo, hi):
            dbeta[j] = t(sg[j - lo])
            dgamma[j] = t(sgx[j - lo])
        nn = t(n)
        for i in range(n):
            g = G[i]
            h = H[i]
            dh = DH[i]
            if batch_stats:
                for j in range(uint64(lo), uint64(hi)):
                    xh = (h[j] - mean[j]) * invstd[j]
                    k = gamma[j] * invstd[j] / nn
                    dh[j] = k * (nn * g[j] - dbeta[j] - xh * dgamma[j])
            else:
                for j in range(uint64(lo), uint64(hi)):
                    dh[j] = g[j] * (gamma[j] * invstd[j])


# ------------------------------------------------------------------------------------ data


def _gather_rows(X, idx, mean, inv_std, standardize, out):
    """out[i, :] = X[idx[i], :], cast to out's dtype; with ``standardize``,
    (X[idx[i], j] - mean[j]) * inv_std[j] computed in float64 first."""
    t = out.dtype.type
    n, m = out.shape
    for i in prange(n):
        src = X[idx[i]]
        o = out[i]
        if standardize:
            for j in range(uint64(0), uint64(m)):
                o[j] = t((np.float64(src[j]) - mean[j]) * inv_std[j])
        else:
            for j in range(uint64(0), uint64(m)):
                o[j] = t(src[j])


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def all_finite(X):
    """Whether every element of the 2-D float array X is finite: one read, no allocation (the
    sum of x - x over a row is 0 for finite values, NaN otherwise; reassoc lets it vectorize)."""
    n, m = X.shape
    for i in range(n):
        x = X[i]
        acc = x[0] - x[0]
        for j in range(uint64(0), uint64(m)):
            acc += x[j] - x[j]
        if acc != acc:
            return False
    return True


# ------------------------------------------------------------------------------------ variants


class _Variants:
    """A kernel compiled two ways: ``parallel`` (prange) and ``serial`` (one thread)."""

    __slots__ = ("name", "parallel", "serial")

    def __init__(self, fn):
        self.name = fn.__name__.lstrip("_")
        self.parallel = _compile(fn, "par", True)
        self.serial = _compile(fn, "ser", False)

    def __call__(self, *args):
        return self.serial(*args)


def _compile(fn, tag, parallel):
    # A renamed copy per variant: Numba's disk cache is keyed by the function's qualified name.
    name = f"{fn.__name__}_{tag}"
    copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__)
    copy.__qualname__ = name
    copy.__module__ = fn.__module__
    return njit(parallel=parallel, cache=True, nogil=True, error_model="numpy")(copy)


act_forward = _Variants(_act_forward)
act_backward = _Variants(_act_backward)
col_sums = _Variants(_col_sums)
softmax_xent = _Variants(_softmax_xent)
softmax_soft = _Variants(_softmax_soft)
sigmoid_bce = _Variants(_sigmoid_bce)
regression = _Variants(_regression)
bn_train = _Variants(_bn_train)
bn_backward = _Variants(_bn_backward)
gather_rows = _Variants(_gather_rows)

KERNELS = (
    act_forward,
    act_backward,
    col_sums,
    softmax_xent,
    softmax_soft,
    sigmoid_bce,
    regression,
    bn_train,
    bn_backward,
    gather_rows,
)


def pick(kernel, elements, threshold=None):
    """The parallel variant of ``kernel`` for ``elements`` >= ``threshold`` (default
    :data:`PARALLEL_MIN_ELEMENTS`), else the serial one."""
    limit = PARALLEL_MIN_ELEMENTS if threshold is None else threshold
    return kernel.parallel if elements >= limit else kernel.serial
