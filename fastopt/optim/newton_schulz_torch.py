"""Muon's bfloat16 Newton–Schulz iteration on host matrices through torch's bfloat16 matrix
products, on CPUs that multiply bfloat16 natively.

``torch.optim.Muon`` runs its iteration in bfloat16 (``_zeropower_via_newtonschulz`` in
``torch/optim/_muon.py``). On a CPU without bfloat16 matrix instructions that is slow, and
:mod:`fastopt.optim.newton_schulz` emulates it with float32 BLAS products of bfloat16 values.
On a CPU with them (AVX512-BF16 or AMX: Intel Sapphire Rapids and later, AMD Zen 4 and later)
oneDNN's bfloat16 products take half the time of float32 ones (measured on a Xeon with AMX, the
64 hidden matrices of the bench's transformer, one thread: 27 ms against NumPy's 56 ms), and
emulation loses to torch. There, when torch is installed, :class:`TorchNewtonSchulz` runs
torch's own operations on bfloat16 tensors: ``grad.bfloat16()``, the transposition of a tall
matrix, the division by the norm clamped at ``eps``, then per step ``A = X Xᵀ``,
``B = addmm(A, A, A, beta=b, alpha=c)`` and ``X = addmm(X, B, X, beta=a)``, into buffers
allocated once. The result is torch's bit for bit (``tests/test_muon_torch_products.py``).
Muon's momentum and update stay fastopt's compiled passes.
"""

import functools
import importlib.util

import numpy as np


@functools.cache
def native_bfloat16_products():
    """True when torch is installed and this CPU multiplies bfloat16 matrices natively
    (torch's ``torch.cpu._is_avx512_bf16_supported`` or ``_is_amx_tile_supported``). torch is
    imported the first time this is asked (by the first bfloat16 Muon step on the CPU)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class TorchNewtonSchulz:
    """Scratch tensors and the bfloat16 iteration for matrices of one shape, with the interface
    of ``newton_schulz.NewtonSchulz``: the caller writes the input, rounded to bfloat16 values,
    into the float32 matrix ``x`` (``emulate_bf16`` is true, so Muon's passes round as for the
    emulation) and reads the float32 result that :meth:`run` returns."""

    emulate_bf16 = True

    def __init__(self, shape):
        import torch

        rows, cols = shape
        self.tall = rows > cols
        wide = (cols, rows) if self.tall else (rows, cols)
        k = min(rows, cols)
        bf16 = torch.bfloat16
        self.x = np.empty(shape, np.float32)
        self.out = np.empty(shape, np.float32)
        self._x = torch.from_numpy(self.x)
        self._out = torch.from_numpy(self.out)
        self._input = torch.empty(shape, dtype=bf16)
        self._a = torch.empty((k, k), dtype=bf16)
        self._b = torch.empty((k, k), dtype=bf16)
        self._y = (torch.empty(wide, dtype=bf16), torch.empty(wide, dtype=bf16))

    def run(self, g, coefficients, steps, eps, *, round_output=True):
        """The orthogonalized ``g`` after ``steps`` iterations: a float32 view of this object's
        scratch, valid until the next call. ``g`` is a C-contiguous host matrix (only read) or
        this object's ``x``. Every product's result is a bfloat16 tensor, as torch's, so
        ``round_output`` changes nothing."""
        import torch

        src = self._x if g is self.x else torch.from_numpy(np.ascontiguousarray(g))
        x = self._input
        x.copy_(src)  # grad.bfloat16(): round to nearest even
        if self.tall:
            x = x.T
        x.div_(x.norm().clamp(min=eps))
        a, b, c = coefficients
        for i in range(steps):
            A = torch.mm(x, x.T, out=self._a)
            B = torch.addmm(A, A, A, beta=b, alpha=c, out=self._b)
            x = torch.addmm(x, B, x, beta=a, out=self._y[i % 2])
        self._out.copy_(x.T if self.tall else x)
        return self.out
