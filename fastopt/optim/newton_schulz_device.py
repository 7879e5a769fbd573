"""Muon's work on one matrix, written once for an array module ``xp``: CuPy on a GPU (the
products through ``cupy.matmul``, i.e. cuBLAS), NumPy in the tests that hold it to the CPU path.

The same three steps as the numba-cpu path of :mod:`fastopt.optim.muon` and
:mod:`fastopt.optim.newton_schulz`, with the same arithmetic, operation by operation:

1. :meth:`DeviceNewtonSchulz.momentum_into`: the gradient scaled and clipped, torch's
   ``buf.lerp_(g, 1 - mu)``, the Nesterov blend ``g.lerp(buf, mu)``, cast to the iteration's
   dtype into its scratch ``x`` (and rounded to bfloat16 when emulating it);
2. :meth:`DeviceNewtonSchulz.run`: X / max(||X||_F, eps), then per step A = X Xᵀ (Xᵀ X for a
   tall matrix), B = A (cA + bI), X ← (B + aI) X (X (B + aI) when tall): the coefficients ride
   inside the products, only k x k work besides them (k = min(m, n)); every product is
   ``xp.matmul`` into a buffer allocated once per (shape, ns_dtype, parameter dtype) and device;
   the norm stays on the device (no synchronisation);
3. :meth:`DeviceNewtonSchulz.apply_update`: ``p = p - (o * scale + weight_decay * p)``, ``o``
   rounded to bfloat16 first when emulating it (the last product is left unrounded until then).

Every element pass is a short sequence of ``xp`` ufuncs writing into that scratch (``out=``),
so each intermediate is rounded where the compiled CPU kernels round it: with NumPy for ``xp``
the results equal the numba-cpu path bit for bit. On a GPU the products are cuBLAS's (another
summation order, so float rounding differs from the CPU BLAS; CuPy uses TF32 for float32 only
when ``CUPY_TF32=1``), and CuPy's elementwise kernels may flush float32 subnormals to zero.

The bfloat16 emulation (``ns_dtype="bfloat16"``) rounds float32 values to bfloat16 by integer
operations on their bits (:func:`round_to_bfloat16`): round to nearest even, NaN to the quiet
NaN 0x7FC0 with its sign, the bits of :func:`fastopt.optim.newton_schulz.bfloat16_bits`.

All work is queued on ``xp``'s current stream and device; the caller enters them
(:func:`launch_context`). Scratch is shared by every matrix of one shape: steps on two streams
must be ordered by the caller (as they must be anyway: they update the same parameters).
"""

import contextlib

import numpy as np

from .newton_schulz import NS_DTYPES

_LOW_BIT = np.uint32(1)
_HALF_MINUS_ONE = np.uint32(0x7FFF)
_HIGH_HALF = np.uint32(0xFFFF0000)
_SIGN = np.uint32(0x80000000)
_QUIET_NAN = np.uint32(0x7FC00000)
_SHIFT = np.uint32(16)


def round_to_bfloat16(xp, x, bits, keep):
    """Round the C-contiguous float32 array ``x`` to bfloat16 values in place: round to nearest,
    ties to even; Inf stays Inf, overflow becomes Inf, NaN becomes the quiet NaN with its sign.
    ``bits`` (uint32) and ``keep`` (bool) are scratch of at least ``x.size`` elements.

    On the bits b of each element: ``(b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000``, and
    ``(b & 0x80000000) | 0x7FC00000`` where the value is NaN."""
    n = x.size
    u = x.reshape(n).view(np.uint32)
    r, k = bits[:n], keep[:n]
    xp.right_shift(u, _SHIFT, out=r)
    xp.bitwise_and(r, _LOW_BIT, out=r)
    xp.add(r, _HALF_MINUS_ONE, out=r)
    xp.add(r, u, out=r)  # modulo 2**32: only NaN bits wrap, and they are replaced below
    xp.bitwise_and(r, _HIGH_HALF, out=r)
    xp.equal(x.reshape(n), x.reshape(n), out=k)  # False exactly for NaN
    xp.bitwise_and(u, _SIGN, out=u)
    xp.bitwise_or(u, _QUIET_NAN, out=u)
    xp.copyto(u, r, where=k)


def launch_context(xp, like, stream):
    """The context every launch of one unit's matrices runs in: the device of ``like`` (a
    device array of that unit) and ``stream`` (a ``cudaStream_t`` handle, CuPy's current
    stream when None). Nothing for NumPy."""
    if xp is np:
        return contextlib.nullcontext()
    from ..kernels import cupy as kcupy

    device = int(like.data.device_id)
    ctx = contextlib.ExitStack()
    ctx.enter_context(xp.cuda.Device(device))
    s = kcupy.as_stream(stream, device)
    if s is not None:
        ctx.enter_context(s)
    return ctx


class DeviceNewtonSchulz:
    """The scratch and the three steps for matrices of one ``shape``, ``ns_dtype`` and
    parameter dtype, on ``xp``'s current device (where it is constructed)."""

    def __init__(self, xp, shape, ns_dtype, param_dtype):
        rows, cols = shape
        n, k = rows * cols, min(rows, cols)
        self.xp = xp
        self.tall = rows > cols
        self.emulate_bf16 = ns_dtype == "bfloat16"
        dtype = NS_DTYPES[ns_dtype]
        self.x = xp.empty(shape, dtype)
        self.y = xp.empty(shape, dtype)
        self.a = xp.empty((k, k), dtype)
        self.b = xp.empty((k, k), dtype)
        self.c = xp.empty((k, k), dtype)
        self.norm = xp.empty(1, dtype)
        self.t = xp.empty(n, param_dtype)  # the scaled gradient, then the decay term
        self.d = xp.empty(n, param_dtype)  # differences, blends and the step
        self.bits = xp.empty(n, np.uint32) if self.emulate_bf16 else None
        self.keep = xp.empty(n, np.bool_) if self.emulate_bf16 else None

    def _round(self, x):
        round_to_bfloat16(self.xp, x, self.bits, self.keep)

    def momentum_into(self, g, buf, h):
        """The momentum pass over one matrix's flat gradient ``g`` and momentum ``buf``
        (updated in place), its result left in ``self.x``, the compiled ``momentum_into`` of
        :mod:`fastopt.optim.muon` in ufuncs: ``g' = clamp(g * gscale, ±clip)`` (no clamp for
        clip 0), ``buf = lerp(buf, g', 1 - mu)`` (torch.lerp: ``a + w (b - a)`` for w < 0.5,
        else ``b - (b - a)(1 - w)``), then ``x = (buf - g') mu + g'`` (``nesterov`` 1),
        ``buf - (buf - g')(1 - mu)`` (2) or ``buf`` (0), in the parameters' dtype, cast to
        ``x``'s and rounded to bfloat16 when emulating it.
        ``h = (gscale, clip, 1 - mu, mu, nesterov)``, the floats in the parameters' dtype."""
        xp, t, d = self.xp, self.t, self.d
        gscale, clip, one_minus_mu, mu, nesterov = h
        gi = g
        if gscale != 1 or clip > 0:  # g * 1 is g: the multiply is skipped, not the result
            gi = xp.multiply(g, gscale, out=t)
            if clip > 0:
                xp.clip(t, -clip, clip, out=t)
        xp.subtract(gi, buf, out=d)
        if one_minus_mu < 0.5:
            xp.multiply(d, one_minus_mu, out=d)
            xp.add(buf, d, out=buf)
        else:
            xp.multiply(d, mu, out=d)
            xp.subtract(gi, d, out=buf)
        x = self.x.reshape(self.x.size)
        same = x.dtype == d.dtype
        if nesterov == 0:
            xp.copyto(x, buf)
        else:
            xp.subtract(buf, gi, out=d)
            if nesterov == 1:
                xp.multiply(d, mu, out=d)
                xp.add(d, gi, out=x if same else d)
            else:
                xp.multiply(d, one_minus_mu, out=d)
                xp.subtract(buf, d, out=x if same else d)
            if not same:
                xp.copyto(x, d)  # computed in the parameters' dtype, then cast once
        if self.emulate_bf16:
            self._round(self.x)

    def run(self, coefficients, steps, eps):
        """The orthogonalized ``self.x`` (written by :meth:`momentum_into`) after ``steps``
        iterations with ``coefficients`` = (a, b, c): one of this object's buffers, valid until
        its next use; the last product is not rounded to bfloat16 (:meth:`apply_update` rounds
        it as it reads it). The arithmetic of ``NewtonSchulz.run``: the norm in the iteration's
        dtype (rounded to bfloat16 when emulating it), X / max(norm, eps), then per step the
        three products into the scratch, A and B rounded before they are read again."""
        xp = self.xp
        x, y, A, B, C = self.x, self.y, self.a, self.b, self.c
        bf16 = self.emulate_bf16
        dt = x.dtype.type
        flat = x.reshape(x.size)
        norm = self.norm
        xp.dot(flat, flat, out=norm.reshape(()))
        xp.sqrt(norm, out=norm)
        if bf16:
            self._round(norm)
        xp.maximum(norm, dt(eps), out=norm)
        xp.divide(x, norm, out=x)
        if bf16:
            self._round(x)
        a, b, c = dt(coefficients[0]), dt(coefficients[1]), dt(coefficients[2])
        k = A.shape[0]
        for i in range(steps):
            xp.matmul(x.T, x, out=A) if self.tall else xp.matmul(x, x.T, out=A)
            if bf16:
                self._round(A)
            xp.multiply(A, c, out=C)  # C = cA + bI
            diag = C.reshape(k * k)[:: k + 1]
            xp.add(diag, b, out=diag)
            xp.matmul(A, C, out=B)
            if bf16:
                self._round(B)
            diag = B.reshape(k * k)[:: k + 1]  # B + aI
            xp.add(diag, a, out=diag)
            xp.matmul(x, B, out=y) if self.tall else xp.matmul(B, x, out=y)
            if bf16 and i < steps - 1:
                self._round(y)
            x, y = y, x
        self.x, self.y = x, y
        return x

    def apply_update(self, p, o, scale, weight_decay):
        """``p = p - (o * scale + weight_decay * p)`` over the flat parameter view ``p`` (the
        decay term skipped when 0), ``o`` (:meth:`run`'s result) rounded to bfloat16 first when
        emulating it and cast to ``p``'s dtype before the multiply, as the compiled
        ``apply_update``; ``scale`` and ``weight_decay`` in ``p``'s dtype."""
        xp, t, d = self.xp, self.t, self.d
        if self.emulate_bf16:
            self._round(o)
        src = o.reshape(o.size)
        if src.dtype != d.dtype:
            xp.copyto(d, src)
            src = d
        xp.multiply(src, scale, out=d)
        if weight_decay != 0:
            xp.multiply(p, weight_decay, out=t)
            xp.add(d, t, out=d)
        xp.subtract(p, d, out=p)
