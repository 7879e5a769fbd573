"""The preallocated intermediates of one forward(+backward) pass of a :class:`fastopt.nn.MLP`,
and the per-model cache of them (one workspace per batch size and mode, least recently used
dropped first), so that a training step allocates no arrays."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["Workspace", "WorkspaceCache"]

MAX_WORKSPACES = 6
"""Workspaces kept per model (one per batch size and mode), least recently used dropped first."""


class Workspace:
    """Every intermediate array of one forward(+backward) pass over ``n`` rows.

    Per layer l: ``H`` the matrix product, ``A`` the activation output (the output layer's
    values for the last layer), ``Z`` the pre-activation (GELU only: its derivative needs it),
    ``U`` the dropout uniforms; backward: ``G`` = dLoss/dA, ``D`` = dLoss/d(pre-activation).
    For a batch-norm layer the batch-norm backward writes dLoss/dH into ``G``. No two of these
    alias: the kernels vectorize only over distinct arrays."""

    def __init__(self, model, n, train):
        xp, dt = model._xp, model.dtype
        L = model.n_layers
        self.n = n
        self.train = train
        self.X = xp.empty((n, model.n_features), dt)
        self.H, self.Z, self.A, self.G, self.D, self.U = ([None] * L for _ in range(6))
        self.mean, self.invstd, self.s, self.shift = ([None] * L for _ in range(4))
        for l, width in enumerate(model.sizes[1:]):
            hidden = l < L - 1
            bn = hidden and model.batch_norm
            self.H[l] = xp.empty((n, width), dt)
            self.A[l] = xp.empty((n, width), dt)
            self.Z[l] = (
                xp.empty((n, width), dt) if hidden and model.activation == "gelu" else model._e2
            )
            if train and hidden:
                self.G[l] = xp.empty((n, width), dt)
            if train or not hidden:
                self.D[l] = xp.empty((n, width), dt)
            if train and hidden and model.dropout > 0:
                self.U[l] = xp.empty((n, width), dt)
            if bn:
                self.mean[l] = xp.empty(width, dt)
                self.invstd[l] = xp.empty(width, dt)
                self.s[l] = xp.empty(width, dt)
                self.shift[l] = xp.empty(width, dt)
        k = model.n_outputs
        self.row_loss = xp.empty(n, np.float64)
        self.row_correct = xp.empty(n, np.int64)
        self.row_abs = xp.empty(n, np.float64)
        self.row_sq = xp.empty(n, np.float64)
        self.labels = xp.empty(n, np.int64) if model.loss == "cross_entropy" else None
        self.T = xp.empty((n, k), dt)


class WorkspaceCache:
    """The workspaces of one model, by (rows, training mode)."""

    def __init__(self, model):
        self.model = model
        self._cache = OrderedDict()

    def get(self, n, train):
        """The workspace for ``n`` rows (built on first use); ``train`` adds the backward
        buffers."""
        key = (n, bool(train))
        ws = self._cache.get(key)
        if ws is None:
            ws = Workspace(self.model, n, train)
            self._cache[key] = ws
            while len(self._cache) > MAX_WORKSPACES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return ws
