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

from ..arrays import torch_numpy


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


def _bits(t):
    """A NumPy uint16 view of the bfloat16 tensor ``t`` (its memory, its strides)."""
    return torch_numpy(t).view(np.uint16)


class TorchNewtonSchulz:
    """Scratch tensors and the bfloat16 iteration for matrices of one shape. Muon writes the
    input's bfloat16 bits into ``input_bits`` (``muon.momentum_into_bits``), calls
    :meth:`run_loaded` and applies the bfloat16 bits it returns (``muon.apply_update_bits``):
    no float32 copy of the matrix on either side. :meth:`run` takes a float matrix, as
    ``newton_schulz.NewtonSchulz.run``."""

    def __init__(self, shape):
        import torch

        rows, cols = shape
        self.tall = rows > cols
        wide = (cols, rows) if self.tall else (rows, cols)
        k = min(rows, cols)
        bf16 = torch.bfloat16
        self._input = torch.empty(shape, dtype=bf16)
        self._a = torch.empty((k, k), dtype=bf16)
        self._b = torch.empty((k, k), dtype=bf16)
        self._y = (torch.empty(wide, dtype=bf16), torch.empty(wide, dtype=bf16))
        self.input_bits = _bits(self._input)
        # the result's bits in the matrix's orientation: a tall matrix's is the transposed view
        self._result_bits = [_bits(y.T if self.tall else y) for y in self._y]
        self.out = np.empty(shape, np.float32)

    def run_loaded(self, coefficients, steps, eps):
        """The bfloat16 bits (a (rows, cols) uint16 view of this object's scratch, valid until
        the next call) of the orthogonalized matrix whose bits are in ``input_bits``."""
        import torch

        x = self._input.T if self.tall else self._input
        x.div_(x.norm().clamp(min=eps))
        a, b, c = coefficients
        for i in range(steps):
            A = torch.mm(x, x.T, out=self._a)
            B = torch.addmm(A, A, A, beta=b, alpha=c, out=self._b)
            x = torch.addmm(x, B, x, beta=a, out=self._y[i % 2])
        return self._result_bits[(steps - 1) % 2] if steps else self.input_bits

    def run(self, g, coefficients, steps, eps):
        """The orthogonalized float matrix ``g`` (only read): float32, a view of this object's
        scratch valid until the next call. ``g`` is rounded to bfloat16 first, as torch's
        ``grad.bfloat16()``."""
        import torch

        self._input.copy_(torch.from_numpy(np.ascontiguousarray(g)))
        bits = self.run_loaded(coefficients, steps, eps)
        self.out.view(np.uint32)[...] = bits.astype(np.uint32) << 16
        return self.out
