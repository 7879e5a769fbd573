"""Checks of the inputs and targets an :class:`fastopt.nn.MLP` is given: the shapes, dtypes and
values each loss needs, with a clear ValueError/TypeError naming the problem before any work."""

from __future__ import annotations

import numpy as np

__all__ = ["all_finite", "check_features", "check_targets", "kernel_dtype"]


def all_finite(X, xp):
    """Whether every element of the 2-D array ``X`` is finite (one Numba pass, no temporary, for
    a float NumPy array)."""
    if xp is np and X.size and X.dtype in (np.float32, np.float64):
        from ..kernels.nn_cpu import all_finite as kernel

        return bool(kernel(X))
    return bool(xp.isfinite(X).all())


def kernel_dtype(dtype):
    """The dtype features of ``dtype`` (kind f, i, u or b) are converted to so that the kernels
    take them: float32 and float64 as they are (native byte order), float16 to float32 (exact),
    every other float (long double) and integers and bools to float64. Integers are NOT cast to
    the model's dtype: standardization runs in float64 from the raw values (as for float64
    ``X``), so large integers (timestamps, ids) keep their low bits, which float32 would round
    away before the mean is subtracted."""
    if dtype.kind == "f" and dtype.itemsize in (4, 8):
        return np.dtype(dtype.type)  # native byte order
    if dtype.kind == "f" and dtype.itemsize < 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def check_features(X, xp, n_features, dtype, what="X"):
    """``X`` as a 2-D float32/float64 array of native byte order and ``n_features`` columns,
    every value finite (see :func:`kernel_dtype` for what other dtypes become; ``dtype``, the
    model's, is not used for them: rows are cast to it after standardization)."""
    X = xp.asarray(X)
    if X.dtype.kind not in "fiub":
        raise TypeError(f"{what} must hold numbers, got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}")
    if X.shape[1] != n_features:
        raise ValueError(f"{what} has {X.shape[1]} features, but the model expects {n_features}")
    if X.shape[0] == 0:
        raise ValueError(f"{what} has no samples")
    is_float = X.dtype.kind == "f"
    target = kernel_dtype(X.dtype)
    if X.dtype != target:  # (dtype equality includes the byte order)
        X = X.astype(target)
    if is_float and not all_finite(X, xp):
        raise ValueError(f"{what} contains NaN or infinity")
    return X


def check_targets(y, xp, loss, n_outputs, dtype, n=None, what="y"):
    """The targets as ``loss`` (a :class:`fastopt.nn.losses.Loss`) needs them: int64 labels
    (cross-entropy, 1-D ``y``) or an (n, n_outputs) array of ``dtype``; checked: length ``n``,
    labels in [0, n_outputs), finite values, probabilities in [0, 1]."""
    y = xp.asarray(y)
    if n is not None and y.shape[0:1] != (n,):
        raise ValueError(
            f"X and {what} have different numbers of samples: {n} and "
            f"{y.shape[0] if y.ndim else 'a scalar'}"
        )
    k = n_outputs
    if loss.name == "cross_entropy" and y.ndim == 1:
        if y.dtype.kind == "f":
            if not bool(xp.all(y == xp.round(y))):
                raise ValueError(f"{what}: class labels must be integers")
        elif y.dtype.kind not in "iub":
            raise TypeError(f"{what}: class labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
        if y.size and (int(y.min()) < 0 or int(y.max()) >= k):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise ValueError(f"{what}: label {bad} is outside [0, {k}) for a {k}-class model")
        return y
    if y.dtype.kind not in "fiub":
        raise TypeError(f"{what} must hold numbers, got dtype {y.dtype}")
    if y.ndim == 1 and k == 1:
        y = y.reshape(-1, 1)
    if y.ndim != 2 or y.shape[1] != k:
        raise ValueError(f"{what} must have shape (n, {k}), got {tuple(y.shape)}")
    y = y.astype(dtype)
    if not bool(xp.isfinite(y).all()):
        raise ValueError(f"{what} contains NaN or infinity")
    if loss.probability_targets and (bool((y < 0).any()) or bool((y > 1).any())):
        raise ValueError(f"{what}: probability targets must lie in [0, 1]")
    return y
