"""``elementwise(f, nargs, out_dtype)``: a Numba loop applying a scalar helper over arrays, shared
by the storage tests (plain and simulator runs)."""

import numba
import numpy as np


def elementwise(f, nargs, out_dtype):
    """A function of ``nargs`` equal-length 1-D arrays returning ``out[i] = f(a0[i], ...)`` as a
    new array of ``out_dtype``, the loop compiled with ``numba.njit`` (one or two arguments)."""
    if nargs == 1:

        @numba.njit
        def run(a, out):
            for i in range(out.size):
                out[i] = f(a[i])
    else:

        @numba.njit
        def run(a, b, out):
            for i in range(out.size):
                out[i] = f(a[i], b[i])

    def call(*arrays):
        out = np.empty(arrays[0].size, out_dtype)
        run(*arrays, out)
        return out

    return call
