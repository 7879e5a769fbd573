"""The numba-cuda storage loops in packs of ``PACK`` elements: each thread reads a 16-bit array's
``PACK`` consecutive elements with one aligned 8-byte load and writes them back with one
store, as the CuPy storage kernel does (``FO_PACK`` of ``optim_kernels.cu``).

One 2-byte access per array and thread moved 1.76 TB/s on an H200 for bfloat16 AdamW (CuPy's
packs: 3.7 TB/s); the element loops of ``kernels/loops.py`` stay the CPU's, where LLVM packs the
lanes itself. Per pack the template copies every array's ``PACK`` elements into a thread-local
array (an 8-byte word of a 16-bit array split into four ``uint16``; a float32 or float64 array
read element by element), runs the unchanged element access of ``kernels/access.py`` and the
rule on those locals (``load_param(pl, wl, k)``, ...) with the random bits of the element's own
index, and writes the locals back. The loops over ``k < PACK`` unroll, so the locals live in
registers. A pack that is not whole (the last ``n % PACK`` elements), and every pack when a
16-bit array does not start on an 8-byte boundary (a view at an odd offset), is read and written
element by element: the same values, so the bits never depend on the alignment.

:func:`bind` returns, per storage combination, the globals the templates call besides those of
``access.bind``: for each of ``p``, ``w`` (the master copy), ``g`` and the state ``s``, its
local dtype (``P_T`` ...), ``unpack_x(a, words, q, m, wide, loc)`` and ``pack_x(...)``
(``words``: the whole packs of ``a`` as 8-byte words, which the templates view for every array
and only the 16-bit helpers read; ``pack_g`` is never called: the gradient is read only), and
``aligned_x(a)``. The helpers are plain Python on NumPy arrays too
(the CUDA simulator runs them so).
"""

import builtins
import types

import numpy as np

PACK = 4
"""Elements per pack: 8 bytes of 16-bit elements (``FO_PACK`` of ``optim_kernels.cu``)."""
WORD = np.uint64


# ---------------------------------------------------------------------------------------------
# Per-array helpers. ``m`` is the number of elements of pack ``q`` (``PACK`` but in the last),
# ``wide`` whether the pack is read as one word (whole, and every 16-bit array aligned).


def aligned_bits16(a):
    return a.ctypes.data % 8 == 0


def aligned_plain(a):
    return True


def unpack_bits16(a, words, q, m, wide, loc):
    if wide:
        word = words[q]
        for k in range(PACK):
            loc[k] = np.uint16((word >> WORD(16 * k)) & WORD(0xFFFF))
    else:
        for k in range(PACK):
            if k < m:
                loc[k] = a[q * PACK + k]


def pack_bits16(a, words, q, m, wide, loc):
    if wide:
        word = WORD(0)
        for k in range(PACK):
            word |= WORD(loc[k]) << WORD(16 * k)
        words[q] = word
    else:
        for k in range(PACK):
            if k < m:
                a[q * PACK + k] = loc[k]


def unpack_plain(a, words, q, m, wide, loc):
    for k in range(PACK):
        if k < m:
            loc[k] = a[q * PACK + k]


def pack_plain(a, words, q, m, wide, loc):
    for k in range(PACK):
        if k < m:
            a[q * PACK + k] = loc[k]


def unpack_none(a, words, q, m, wide, loc):
    pass


pack_none = unpack_none


_LOCAL_TYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "bfloat16": np.uint16,
    "float16": np.uint16,
}
"""The dtype of a pack's thread-local copy of an array stored as each dtype (16-bit: its bits)."""
_KINDS = {
    "bits16": (aligned_bits16, unpack_bits16, pack_bits16),
    "plain": (aligned_plain, unpack_plain, pack_plain),
    "none": (aligned_plain, unpack_none, pack_none),
}
"""(aligned, unpack, pack) of a 16-bit array, a float32/float64 array, and the master copy ``w``
of a combination without one (``w`` is then ``p``, written by ``pack_p`` alone)."""


def bind(storage, decorate):
    """The pack globals of the templates below for ``storage`` (an ``access.Storage``; not
    int8), each helper compiled with ``decorate``."""
    stored = {
        "p": storage.param,
        "w": "float32" if storage.master else None,
        "g": storage.grad,
        "s": storage.state,
    }
    out = {"PACK": PACK, "WORD": WORD}
    for x, name in stored.items():
        local = _LOCAL_TYPES.get(name, np.float32)
        kind = "none" if name is None else "bits16" if local is np.uint16 else "plain"
        for role, fn in zip(("aligned", "unpack", "pack"), _KINDS[kind]):
            key = f"{role}_{x}"
            namespace = {"__builtins__": builtins, "np": np, "PACK": PACK, "WORD": WORD}
            copy = types.FunctionType(fn.__code__, namespace, key, fn.__defaults__)
            copy.__qualname__ = key
            out[key] = decorate(copy)
        out[f"{x.upper()}_T"] = local
    return out


# ---------------------------------------------------------------------------------------------
# Templates (one per number of state slots). Globals bound by ``cuda_storage.kernel``: ``cuda``,
# ``rule``, ``transformed_grad``, ``indices`` (grid-stride), the element access of
# ``access.bind`` and the pack helpers of :func:`bind`.


def packed_storage_loop0(p, w, g, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    n4 = n - n % PACK  # the elements in whole packs
    wide = aligned_p(p) and aligned_g(g)
    pw, ww, gw = p[:n4].view(WORD), w[:n4].view(WORD), g[:n4].view(WORD)
    pl, wl, gl = (
        cuda.local.array(PACK, P_T),
        cuda.local.array(PACK, W_T),
        cuda.local.array(PACK, G_T),
    )
    for q in indices((n + PACK - 1) // PACK):
        m = min(PACK, n - q * PACK)
        full = wide and m == PACK
        unpack_p(p, pw, q, m, full, pl)
        unpack_w(w, ww, q, m, full, wl)
        unpack_g(g, gw, q, m, full, gl)
        for k in range(PACK):
            if k < m:
                r = draw(rs, q * PACK + k)
                (x,) = rule(
                    load_param(pl, wl, k), transformed_grad(load_grad(gl, k), gscale, clip), h
                )
                store_param(pl, wl, k, x, r[0])
        pack_p(p, pw, q, m, full, pl)
        pack_w(w, ww, q, m, full, wl)


def packed_storage_loop1(p, w, g, s0, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    n4 = n - n % PACK  # the elements in whole packs
    wide = aligned_p(p) and aligned_g(g) and aligned_s(s0)
    pw, ww, gw, w0 = p[:n4].view(WORD), w[:n4].view(WORD), g[:n4].view(WORD), s0[:n4].view(WORD)
    pl, wl, gl = (
        cuda.local.array(PACK, P_T),
        cuda.local.array(PACK, W_T),
        cuda.local.array(PACK, G_T),
    )
    l0 = cuda.local.array(PACK, S_T)
    for q in indices((n + PACK - 1) // PACK):
        m = min(PACK, n - q * PACK)
        full = wide and m == PACK
        unpack_p(p, pw, q, m, full, pl)
        unpack_w(w, ww, q, m, full, wl)
        unpack_g(g, gw, q, m, full, gl)
        unpack_s(s0, w0, q, m, full, l0)
        for k in range(PACK):
            if k < m:
                r = draw(rs, q * PACK + k)
                x, a = rule(
                    load_param(pl, wl, k),
                    transformed_grad(load_grad(gl, k), gscale, clip),
                    load_state(l0, k),
                    h,
                )
                store_param(pl, wl, k, x, r[0])
                store_state(l0, k, a, r[1])
        pack_p(p, pw, q, m, full, pl)
        pack_w(w, ww, q, m, full, wl)
        pack_s(s0, w0, q, m, full, l0)


def packed_storage_loop2(p, w, g, s0, s1, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    n4 = n - n % PACK  # the elements in whole packs
    wide = aligned_p(p) and aligned_g(g) and aligned_s(s0) and aligned_s(s1)
    pw, ww, gw = p[:n4].view(WORD), w[:n4].view(WORD), g[:n4].view(WORD)
    w0, w1 = s0[:n4].view(WORD), s1[:n4].view(WORD)
    pl, wl, gl = (
        cuda.local.array(PACK, P_T),
        cuda.local.array(PACK, W_T),
        cuda.local.array(PACK, G_T),
    )
    l0, l1 = cuda.local.array(PACK, S_T), cuda.local.array(PACK, S_T)
    for q in indices((n + PACK - 1) // PACK):
        m = min(PACK, n - q * PACK)
        full = wide and m == PACK
        unpack_p(p, pw, q, m, full, pl)
        unpack_w(w, ww, q, m, full, wl)
        unpack_g(g, gw, q, m, full, gl)
        unpack_s(s0, w0, q, m, full, l0)
        unpack_s(s1, w1, q, m, full, l1)
        for k in range(PACK):
            if k < m:
                r = draw(rs, q * PACK + k)
                x, a, b = rule(
                    load_param(pl, wl, k),
                    transformed_grad(load_grad(gl, k), gscale, clip),
                    load_state(l0, k),
                    load_state(l1, k),
                    h,
                )
                store_param(pl, wl, k, x, r[0])
                store_state(l0, k, a, r[1])
                store_state(l1, k, b, r[2])
        pack_p(p, pw, q, m, full, pl)
        pack_w(w, ww, q, m, full, wl)
        pack_s(s0, w0, q, m, full, l0)
        pack_s(s1, w1, q, m, full, l1)


def packed_storage_loop3(p, w, g, s0, s1, s2, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    n = p.size
    n4 = n - n % PACK  # the elements in whole packs
    wide = aligned_p(p) and aligned_g(g) and aligned_s(s0) and aligned_s(s1) and aligned_s(s2)
    pw, ww, gw = p[:n4].view(WORD), w[:n4].view(WORD), g[:n4].view(WORD)
    w0, w1, w2 = s0[:n4].view(WORD), s1[:n4].view(WORD), s2[:n4].view(WORD)
    pl, wl, gl = (
        cuda.local.array(PACK, P_T),
        cuda.local.array(PACK, W_T),
        cuda.local.array(PACK, G_T),
    )
    l0, l1 = cuda.local.array(PACK, S_T), cuda.local.array(PACK, S_T)
    l2 = cuda.local.array(PACK, S_T)
    for q in indices((n + PACK - 1) // PACK):
        m = min(PACK, n - q * PACK)
        full = wide and m == PACK
        unpack_p(p, pw, q, m, full, pl)
        unpack_w(w, ww, q, m, full, wl)
        unpack_g(g, gw, q, m, full, gl)
        unpack_s(s0, w0, q, m, full, l0)
        unpack_s(s1, w1, q, m, full, l1)
        unpack_s(s2, w2, q, m, full, l2)
        for k in range(PACK):
            if k < m:
                r = draw(rs, q * PACK + k)
                x, a, b, c = rule(
                    load_param(pl, wl, k),
                    transformed_grad(load_grad(gl, k), gscale, clip),
                    load_state(l0, k),
                    load_state(l1, k),
                    load_state(l2, k),
                    h,
                )
                store_param(pl, wl, k, x, r[0])
                store_state(l0, k, a, r[1])
                store_state(l1, k, b, r[2])
                store_state(l2, k, c, r[3])
        pack_p(p, pw, q, m, full, pl)
        pack_w(w, ww, q, m, full, wl)
        pack_s(s0, w0, q, m, full, l0)
        pack_s(s1, w1, q, m, full, l1)
        pack_s(s2, w2, q, m, full, l2)


PACKED_TEMPLATES = (
    packed_storage_loop0,
    packed_storage_loop1,
    packed_storage_loop2,
    packed_storage_loop3,
)
"""The packed storage loop of each number of state slots."""
