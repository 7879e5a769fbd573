"""The roofline kernels of ``bench/``: re-exported from :mod:`fastopt.roofline` (compiled with
``numba.njit(parallel=True, cache=True)``), shared with ``fastopt bench``."""

from fastopt.roofline import (  # noqa: F401
    KERNELS,
    bytes_per_element,
    check_roofline_is_identity,
    device_copy_step,
    roofline_rw1,
    roofline_rw2,
    roofline_rw3,
    roofline_rw4,
    roofline_step,
)
