"""The Newton–Schulz orthogonalization of Muon on host matrices, through NumPy's BLAS.

``torch.optim.Muon`` (``torch/optim/_muon.py``, ``_zeropower_via_newtonschulz``) runs, on a
matrix G with k = min(rows, cols), working on Gᵀ when G is tall:

.. math::
    X_0 = G / \\max(\\lVert G\\rVert_F, \\varepsilon),\\quad
    A = X X^T,\\quad B = bA + cA^2,\\quad X \\leftarrow aX + BX \\quad (\\text{ns\\_steps times})

Here a tall matrix keeps its orientation and the products are taken on the other side
(A = XᵀX, X ← aX + XB): the same dot products, so the same values up to rounding, and no
transposed copies. The coefficients ride inside the products: bA + cA² = A (cA + bI) and
aX + BX = (B + aI) X, so besides the three products per step only k x k work is done, no
elementwise pass over the m x n matrix. Every product is ``np.matmul`` into a scratch buffer
allocated once per (shape, dtype) and reused (NumPy calls BLAS ``syrk`` for X Xᵀ). The
parameter's own memory is only read. Everything between the products (the bfloat16 roundings,
cA + bI, B + aI, the division by the norm) is one compiled call each, so a step adds little to
its products besides them: no NumPy call per k x k operation, no Python per element.

``ns_dtype``: the dtype the iteration runs in. torch runs it in bfloat16 (``grad.bfloat16()``).
Most CPUs have no fast bfloat16 matrix product (those that have run torch's:
:mod:`fastopt.optim.newton_schulz_torch`), so ``"bfloat16"`` is emulated: every product is
computed in float32 from bfloat16 values and each result that torch stores as a bfloat16 tensor
is rounded to bfloat16 (round to nearest even): the input matrix, its norm, X after the
division, A, B and each new X (each rounded once, after the whole ``addmm``, as torch). What is
NOT emulated: the accumulation inside a product (float32 here, whatever the BLAS does there),
so results agree with torch to bfloat16 resolution, not bit for bit. ``"float32"`` and
``"float64"`` run the iteration in that dtype.
"""

import math

import numpy as np
from numba import njit

NS_DTYPES = {"bfloat16": np.float32, "float32": np.float32, "float64": np.float64}
"""``ns_dtype`` -> the dtype the products run in (bfloat16 runs in float32, rounded: see above)."""

_kernel = njit(cache=True, nogil=True, error_model="numpy")


@njit(inline="always", cache=True)
def bfloat16_bits(b):
    """The float32 bits ``b`` (a uint32) rounded to bfloat16 (returned as float32 bits): nearest
    even, NaN to the quiet NaN 0x7FC0 with its sign, as ``fastopt.kernels.storage.f32_to_bf16_rne``
    and ml_dtypes (tested against it). A select, not a branch: loops over it vectorize."""
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet = (b & np.uint32(0x80000000)) | np.uint32(0x7FC00000)
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(
        0xFFFF0000
    )
    return quiet if nan else rounded


@_kernel
def _round_bits_to_bfloat16(u):
    # u: the uint32 bits of float32 values, rounded in place.
    for i in range(u.size):
        u[i] = bfloat16_bits(u[i])


@_kernel
def round_matrix(x):
    """Round the C-contiguous float32 matrix ``x`` to bfloat16 values in place (compiled: no
    Python between the products)."""
    _round_bits_to_bfloat16(x.reshape(x.size).view(np.uint32))


def round_to_bfloat16(x):
    """Round the float32 array ``x`` (C-contiguous) to bfloat16 values in place: round to
    nearest, ties to even (Inf stays Inf, overflow becomes Inf, NaN stays NaN)."""
    _round_bits_to_bfloat16(x.reshape(-1).view(np.uint32))


@_kernel
def _divide(x, g, d, emulate_bf16):
    """``x = g / d`` (``g`` cast to ``x``'s dtype first), rounded to bfloat16 when
    ``emulate_bf16``; ``g`` may be ``x`` (then one array is read and written: LLVM vectorizes
    that loop, not one over two arrays that overlap)."""
    xf = x.reshape(x.size)
    if g.ctypes.data == x.ctypes.data:
        for i in range(xf.size):
            xf[i] = xf[i] / d
    else:
        gf = g.reshape(g.size)
        dt = xf.dtype.type
        for i in range(xf.size):
            xf[i] = dt(gf[i]) / d
    if emulate_bf16:
        round_matrix(x)


@_kernel
def _polynomial(a, out, c, b, emulate_bf16):
    """``a`` rounded to bfloat16 in place when ``emulate_bf16``, then ``out = c a + b I``
    (``a * c``, then ``+ b`` on the diagonal, as NumPy's ``multiply`` and ``+=`` round)."""
    if emulate_bf16:
        round_matrix(a)
    k = a.shape[0]
    for i in range(k):
        for j in range(k):
            out[i, j] = a[i, j] * c
        out[i, i] += b


@_kernel
def _plus_identity(m, d, emulate_bf16):
    """``m`` rounded to bfloat16 in place when ``emulate_bf16``, then ``m += d I``."""
    if emulate_bf16:
        round_matrix(m)
    for i in range(m.shape[0]):
        m[i, i] += d


class NewtonSchulz:
    """Scratch buffers and the iteration for matrices of one shape and ``ns_dtype``."""

    def __init__(self, shape, ns_dtype):
        rows, cols = shape
        self.tall = rows > cols
        self.emulate_bf16 = ns_dtype == "bfloat16"
        dtype = NS_DTYPES[ns_dtype]
        k = min(rows, cols)
        self.x = np.empty(shape, dtype)
        self.y = np.empty(shape, dtype)
        self.a = np.empty((k, k), dtype)
        self.b = np.empty((k, k), dtype)
        self.c = np.empty((k, k), dtype)

    def run(self, g, coefficients, steps, eps, *, round_output=True):
        """The orthogonalized ``g`` after ``steps`` iterations with ``coefficients`` = (a, b, c):
        a view of this object's scratch, valid until the next call. ``g`` is a C-contiguous
        host matrix (only read) or this object's ``x`` already holding the input in the
        iteration's dtype, rounded to bfloat16 when emulating it (Muon's momentum kernel writes
        it so). ``round_output=False`` leaves the last product unrounded, for a caller that
        rounds it as it reads it.

        The coefficients ride inside the products, so no pass over the m x n matrix is spent on
        them: bA + cA² is taken as A (cA + bI) and aX + BX as (B + aI) X (X (B + aI) when tall);
        only k x k work is added (k = min(m, n))."""
        x, y, A, B, C = self.x, self.y, self.a, self.b, self.c
        bf16 = self.emulate_bf16
        dt = x.dtype.type
        if g is not x and (bf16 or g.dtype != x.dtype):
            _divide(x, g, dt(1.0), bf16)  # the cast (and rounding) of the input
            g = x
        flat = g.reshape(-1)
        norm = math.sqrt(float(np.dot(flat, flat)))  # BLAS dot, in the iteration's dtype
        if bf16:
            n = np.array([[norm]], np.float32)
            round_matrix(n)
            norm = float(n[0, 0])
        _divide(x, g, dt(max(norm, eps)), bf16)
        a, b, c = dt(coefficients[0]), dt(coefficients[1]), dt(coefficients[2])
        for i in range(steps):
            np.matmul(x.T, x, out=A) if self.tall else np.matmul(x, x.T, out=A)
            _polynomial(A, C, c, b, bf16)
            np.matmul(A, C, out=B)
            _plus_identity(B, a, bf16)
            np.matmul(x, B, out=y) if self.tall else np.matmul(B, x, out=y)
            if bf16 and (round_output or i < steps - 1):
                round_matrix(y)
            x, y = y, x
        self.x, self.y = x, y
        return x
