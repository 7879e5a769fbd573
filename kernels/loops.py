"""The elementwise loop templates of the Numba targets, shared by ``cpu.py`` and ``cuda.py``.

One template per number of state slots. ``compile_rules.loop_kernel`` makes a copy of one per
rule and target with these globals bound:

- ``rule``: the compiled rule of ``rules.py``;
- ``transformed_grad``: its compiled gradient transform (scale, then clip);
- ``indices(n)``: the indices this thread updates: ``numba.prange`` (CPU, parallel), ``range``
  (CPU, serial), or the grid-stride range ``range(cuda.grid(1), n, cuda.gridsize(1))`` (CUDA, a
  device function; it compiles to the same PTX as that range written in the loop).

``gs`` = (gradient scale, clip value or 0); ``h`` is the rule's scalar tuple. Each element is read
and written once, so the result does not depend on the thread count or launch configuration.
"""


def loop0(p, g, h, gs):
    for i in indices(p.size):
        (p[i],) = rule(p[i], transformed_grad(g[i], gs[0], gs[1]), h)


def loop1(p, g, s0, h, gs):
    for i in indices(p.size):
        p[i], s0[i] = rule(p[i], transformed_grad(g[i], gs[0], gs[1]), s0[i], h)


def loop2(p, g, s0, s1, h, gs):
    for i in indices(p.size):
        p[i], s0[i], s1[i] = rule(p[i], transformed_grad(g[i], gs[0], gs[1]), s0[i], s1[i], h)


def loop3(p, g, s0, s1, s2, h, gs):
    for i in indices(p.size):
        p[i], s0[i], s1[i], s2[i] = rule(
            p[i], transformed_grad(g[i], gs[0], gs[1]), s0[i], s1[i], s2[i], h
        )


TEMPLATES = (loop0, loop1, loop2, loop3)
"""The template of each number of state slots (index = ``compile_rules.ARITY[rule]``)."""
