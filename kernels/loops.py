"""The elementwise loop templates of the Numba targets, shared by ``cpu.py`` and ``cuda.py``.

One template per number of state slots. ``compile_rules.loop_kernel`` makes a copy of one per
rule and target with these globals bound:

- ``rule``: the compiled rule of ``rules.py``;
- ``transformed_grad``: its compiled gradient transform (scale, then clip);
- ``indices(n)``: the indices this thread updates: ``numba.prange`` (CPU, parallel), ``range``
  (CPU, serial), or the grid-stride range ``range(cuda.grid(1), n, cuda.gridsize(1))`` (CUDA, a
  device function; it compiles to the same PTX as that range written in the loop).

Every loop takes its per-step scalars as ONE tuple ``hs = (*h, gradient scale, clip value or 0)``
in the compute dtype: ``h`` is the rule's scalar tuple, the last two are ``transformed_grad``'s.
The split (``hs[:-2]``, ``hs[-2]``, ``hs[-1]``) is static, resolved at compile time; one tuple
instead of two saves the host work of one launch argument (numba-cuda prepares every argument in
Python on every launch). Each element is read and written once, so the result does not depend on
the thread count or launch configuration.
"""


def loop0(p, g, hs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        (p[i],) = rule(p[i], transformed_grad(g[i], gscale, clip), h)


def loop1(p, g, s0, hs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        p[i], s0[i] = rule(p[i], transformed_grad(g[i], gscale, clip), s0[i], h)


def loop2(p, g, s0, s1, hs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        p[i], s0[i], s1[i] = rule(p[i], transformed_grad(g[i], gscale, clip), s0[i], s1[i], h)


def loop3(p, g, s0, s1, s2, hs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        p[i], s0[i], s1[i], s2[i] = rule(
            p[i], transformed_grad(g[i], gscale, clip), s0[i], s1[i], s2[i], h
        )


TEMPLATES = (loop0, loop1, loop2, loop3)
"""The template of each number of state slots (index = ``compile_rules.ARITY[rule]``)."""


# ---------------------------------------------------------------------------------------------
# Storage loops (the precision issue): the same loops for arrays stored in another dtype than the
# one the rule computes in. ``kernels/access.py`` binds, per storage combination:
#
# - ``load_param(p, w, i)`` / ``store_param(p, w, i, x, r)``: the parameter in the compute dtype,
#   read from ``p`` (widened) or from the float32 master copy ``w``; stored rounded into ``p``
#   (and exactly into ``w``);
# - ``load_grad(g, i)``, ``load_state(s, i)`` / ``store_state(s, i, x, r)``: widen and round;
# - ``draw(rs, i)``: four random words for element ``i`` (``rs`` = seed, step, index offset),
#   one per store, for stochastic rounding; zeros when rounding to nearest.
#
# Without a master copy ``w`` is ``p`` (unused). ``rs`` stays an integer tuple of its own: seeds
# are 64-bit and steps unbounded, which a float32 (or float64) ``hs`` would not hold exactly.


def storage_loop0(p, w, g, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        r = draw(rs, i)
        (x,) = rule(load_param(p, w, i), transformed_grad(load_grad(g, i), gscale, clip), h)
        store_param(p, w, i, x, r[0])


def storage_loop1(p, w, g, s0, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        r = draw(rs, i)
        x, a = rule(
            load_param(p, w, i),
            transformed_grad(load_grad(g, i), gscale, clip),
            load_state(s0, i),
            h,
        )
        store_param(p, w, i, x, r[0])
        store_state(s0, i, a, r[1])


def storage_loop2(p, w, g, s0, s1, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        r = draw(rs, i)
        x, a, b = rule(
            load_param(p, w, i),
            transformed_grad(load_grad(g, i), gscale, clip),
            load_state(s0, i),
            load_state(s1, i),
            h,
        )
        store_param(p, w, i, x, r[0])
        store_state(s0, i, a, r[1])
        store_state(s1, i, b, r[2])


def storage_loop3(p, w, g, s0, s1, s2, hs, rs):
    h, gscale, clip = hs[:-2], hs[-2], hs[-1]
    for i in indices(p.size):
        r = draw(rs, i)
        x, a, b, c = rule(
            load_param(p, w, i),
            transformed_grad(load_grad(g, i), gscale, clip),
            load_state(s0, i),
            load_state(s1, i),
            load_state(s2, i),
            h,
        )
        store_param(p, w, i, x, r[0])
        store_state(s0, i, a, r[1])
        store_state(s1, i, b, r[2])
        store_state(s2, i, c, r[3])


STORAGE_TEMPLATES = (storage_loop0, storage_loop1, storage_loop2, storage_loop3)
"""The storage loop of each number of state slots."""


def convert_loop(dst, src, rs, word):
    """``dst[i] = src[i]`` converted: widened exactly, or rounded as the storage loops round
    (to nearest even, or stochastically with word ``word`` of ``draw(rs, i)``). The staging of
    the per-tensor and matrix rules (``fastopt/optim/staging.py``) runs their float32 kernels
    between such passes."""
    for i in indices(dst.size):
        r = draw(rs, i)
        store_dst(dst, i, load_src(src, i), r[word])
