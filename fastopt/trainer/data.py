"""The Trainer's data: checking it, and the seeded (stratified) validation split."""

import math

import numpy as np

from ..arrays import to_host


def prepare(model, X, y, validation_data, validation_split, seed):
    """(X, y, training row indices, validation) after the model's checks; validation is None,
    ``(X_val, y_val, None)`` or ``(X, y, validation rows)`` for a split of (X, y)."""
    X = model.check_X(X)
    y = model.check_targets(y, X.shape[0])
    n = X.shape[0]
    train_rows = np.arange(n, dtype=np.int64)
    val = None
    if validation_data is not None:
        if validation_split:
            raise ValueError("pass either validation_split or validation_data, not both")
        try:
            Xv, yv = validation_data
        except (TypeError, ValueError):
            raise TypeError("validation_data must be a pair (X_val, y_val)") from None
        Xv = model.check_X(Xv, "X_val")
        yv = model.check_targets(yv, Xv.shape[0], "y_val")
        val = (Xv, yv, None)
    elif validation_split:
        train_rows, val_rows = split(y, n, validation_split, seed)
        val = (X, y, val_rows)
    return X, y, train_rows, val


def split(y, n, fraction, seed):
    """(train rows, validation rows): ``ceil(fraction * n)`` validation rows drawn from
    ``default_rng([seed, 2**32 + 1])``, stratified for class labels (each class contributes
    ``round(fraction * count)`` rows, then a top-up or trim to the total)."""
    rng = np.random.default_rng([seed, 2**32 + 1])
    n_val = int(math.ceil(fraction * n))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"validation_split={fraction} leaves no training or no validation samples out of {n}"
        )
    labels = to_host(y) if y.ndim == 1 else None
    if labels is None:
        perm = rng.permutation(n)
        val = np.sort(perm[:n_val])
    else:
        val_parts = []
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            rng.shuffle(rows)
            val_parts.append(rows[: int(round(fraction * rows.size))])
        val = np.concatenate(val_parts)
        if val.size != n_val:
            rest = np.setdiff1d(np.arange(n), val)
            if val.size < n_val:
                val = np.concatenate([val, rng.choice(rest, n_val - val.size, replace=False)])
            else:
                val = rng.choice(val, n_val, replace=False)
        val = np.sort(val)
    mask = np.ones(n, bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val.astype(np.int64)
