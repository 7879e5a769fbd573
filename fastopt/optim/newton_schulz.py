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
parameter's own memory is only read.

``ns_dtype``: the dtype the iteration runs in. torch runs it in bfloat16 (``grad.bfloat16()``).
The CPU has no fast bfloat16 matrix product, so ``"bfloat16"`` is emulated: every product is
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


@njit(cache=True, nogil=True, error_model="numpy")
def _round_bits_to_bfloat16(u):
    # u: the uint32 bits of float32 values. Nearest even, NaN to the quiet NaN 0x7FC0 with its
    # sign, as fastopt.kernels.storage.f32_to_bf16_rne and ml_dtypes (tested against it).
    for i in range(u.size):
        b = u[i]
        if (b & 0x7FFFFFFF) > 0x7F800000:
            u[i] = (b & 0x80000000) | 0x7FC00000
        else:
            u[i] = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000


def round_to_bfloat16(x):
    """Round the float32 array ``x`` (C-contiguous) to bfloat16 values in place: round to
    nearest, ties to even (Inf stays Inf, overflow becomes Inf, NaN stays NaN)."""
    _round_bits_to_bfloat16(x.reshape(-1).view(np.uint32))


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

    def _round(self, m):
        if self.emulate_bf16:
            round_to_bfloat16(m)

    def run(self, g, coefficients, steps, eps):
        """The orthogonalized ``g`` (a C-contiguous host matrix, only read, or this object's
        ``x``, which it then starts from) after ``steps``
        iterations with ``coefficients`` = (a, b, c): a view of this object's scratch, valid
        until the next call.

        The coefficients ride inside the products, so no pass over the m x n matrix is spent on
        them: bA + cA² is taken as A (cA + bI) and aX + BX as (B + aI) X (X (B + aI) when tall);
        only k x k work is added (k = min(m, n))."""
        a, b, c = coefficients
        x, y, A, B, C = self.x, self.y, self.a, self.b, self.c
        if g is not x and (self.emulate_bf16 or g.dtype != x.dtype):
            np.copyto(x, g, casting="unsafe")
            g = x
        if g is x:
            self._round(x)
        flat = g.reshape(-1)
        norm = math.sqrt(float(np.dot(flat, flat)))  # BLAS dot, in the iteration's dtype
        if self.emulate_bf16:
            n = np.array([norm], np.float32)
            round_to_bfloat16(n)
            norm = float(n[0])
        dt = x.dtype.type
        np.divide(g, dt(max(norm, eps)), out=x)
        self._round(x)
        a, b, c = dt(a), dt(b), dt(c)
        k = A.shape[0]
        diag_b, diag_c = B.reshape(-1)[:: k + 1], C.reshape(-1)[:: k + 1]
        for _ in range(steps):
            if self.tall:
                np.matmul(x.T, x, out=A)
            else:
                np.matmul(x, x.T, out=A)
            self._round(A)
            np.multiply(A, c, out=C)
            diag_c += b
            np.matmul(A, C, out=B)
            self._round(B)
            diag_b += a
            if self.tall:
                np.matmul(x, B, out=y)
            else:
                np.matmul(B, x, out=y)
            self._round(y)
            x, y = y, x
        self.x, self.y = x, y
        return x
