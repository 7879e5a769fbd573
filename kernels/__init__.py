"""Compiled kernels of fastopt (installed as ``fastopt.kernels``).

``rules`` holds each update rule once as scalar Python, with the fields of its per-step scalars;
``layout`` the constants every target shares and the generator of ``rules_layout.cuh``;
``loops`` the elementwise loop templates that ``compile_rules`` specialises per rule and target:
``cpu`` compiles them with ``numba.njit``, ``cuda`` with ``numba.cuda.jit``; ``rules.cuh`` and
``cupy`` are the CUDA C version for CuPy. Backends import their module lazily so CPU-only
machines never touch CUDA.
"""
