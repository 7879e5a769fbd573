"""The Newton–Schulz orthogonalization of Muon on host matrices, through NumPy's BLAS.

``torch.optim.Muon`` (``torch/optim/_muon.py``, ``_zeropower_via_newtonschulz``) runs, on a
matrix G with k = min(rows, cols), working on Gᵀ when G is tall:

.. math::
    X_0 = G / \\max(\\lVert G\\rVert_F, \\varepsilon),\\quad
    A = X X^T,\\quad B = bA + cA^2,\\quad X \\leftarrow aX + BX \\quad (\\text{ns\\_steps times})

Here a tall matrix keeps its orientation and the products are taken on the other side
(A = XᵀX, X ← aX + XB): the same dot products, so the same values up to rounding, and no
transposed copies. Every product is ``np.matmul`` into a scratch buffer allocated once per
(shape, dtype) and reused (NumPy calls BLAS ``syrk`` for X Xᵀ). The parameter's own memory
is only read.

``ns_dtype``: the dtype the iteration runs in. torch runs it in bfloat16 (``grad.bfloat16()``).
The CPU has no fast bfloat16 matrix product, so ``"bfloat16"`` is emulated: every product is
computed in float32 from bfloat16 values and each result that torch stores as a bfloat16 tensor
is rounded to bfloat16 (round to nearest even): the input matrix, its norm, X after the
division, A, B (rounded once, after b·A + c·A², as torch's ``addmm``) and each new X. What is
NOT emulated: the accumulation inside a product (float32 here, whatever the BLAS does there),
so results agree with torch to bfloat16 resolution, not bit for bit. ``"float32"`` and
``"float64"`` run the iteration in that dtype.
"""

import math

import numpy as np

from ..kernels import cpu

NS_DTYPES = {"bfloat16": np.float32, "float32": np.float32, "float64": np.float64}
"""``ns_dtype`` -> the dtype the products run in (bfloat16 runs in float32, rounded: see above)."""


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def round_to_bfloat16(x, tmp):
    """Round float32 ``x`` to bfloat16 values in place (nearest even), through ``tmp`` (a
    bfloat16 array of ``x``'s shape)."""
    np.copyto(tmp, x, casting="unsafe")
    np.copyto(x, tmp, casting="unsafe")


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
        if self.emulate_bf16:
            bf16 = _bf16()
            self.tmp_x = np.empty(shape, bf16)
            self.tmp_k = np.empty((k, k), bf16)

    def _round_x(self, x):
        if self.emulate_bf16:
            round_to_bfloat16(x, self.tmp_x)

    def _round_k(self, m):
        if self.emulate_bf16:
            round_to_bfloat16(m, self.tmp_k)

    def run(self, g, coefficients, steps, eps):
        """The orthogonalized ``g`` (a host matrix, only read) after ``steps`` iterations with
        ``coefficients`` = (a, b, c): a view of this object's scratch, valid until the next
        call."""
        a, b, c = coefficients
        x, y, A, B = self.x, self.y, self.a, self.b
        np.copyto(x, g, casting="unsafe")
        self._round_x(x)
        sumsq, _ = cpu.sumsq_and_finite(x.reshape(-1))
        norm = math.sqrt(sumsq)
        if self.emulate_bf16:
            norm = float(np.float32(norm).astype(_bf16()))
        np.divide(x, x.dtype.type(max(norm, eps)), out=x)
        self._round_x(x)
        dt = x.dtype.type
        a, b, c = dt(a), dt(b), dt(c)
        for _ in range(steps):
            if self.tall:
                np.matmul(x.T, x, out=A)
            else:
                np.matmul(x, x.T, out=A)
            self._round_k(A)
            np.matmul(A, A, out=B)
            B *= c
            A *= b
            B += A
            self._round_k(B)
            if self.tall:
                np.matmul(x, B, out=y)
            else:
                np.matmul(B, x, out=y)
            x *= a
            y += x
            self._round_x(y)
            x, y = y, x
        self.x, self.y = x, y
        return x
