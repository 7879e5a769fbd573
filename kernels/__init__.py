"""Compiled kernels of fastopt (installed as ``fastopt.kernels``).

``rules`` holds each update rule once as scalar Python; ``cpu`` compiles them with ``numba.njit``
into parallel loops; ``cuda`` with ``numba.cuda.jit``; ``rules.cuh`` and ``cupy`` are the CUDA C
version for CuPy. Backends import their module lazily so CPU-only machines never touch CUDA.
"""
