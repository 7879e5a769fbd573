"""The losses of :class:`fastopt.nn.MLP`: one registry, :data:`LOSSES`, name -> definition.

=================  ==========  =================================================================
``loss``           head        targets; reduction (torch's defaults)
=================  ==========  =================================================================
``cross_entropy``  softmax     int labels in [0, K), or rows of probabilities (both with
                               ``label_smoothing``: t -> (1-eps)·t + eps/K, as torch); mean
                               over samples
``kl_div``         softmax     rows of probabilities; KL(t || softmax(z)) summed over classes,
                               mean over samples (torch ``KLDivLoss(reduction="batchmean")``)
``bce``            sigmoid     0/1 (or probabilities) of shape (n, K); mean over all elements
``mse``            identity    real values (n, K) or (n,) when K == 1; mean over all elements
``l1``             identity    as mse
``huber``          identity    as mse (``huber_delta``)
=================  ==========  =================================================================

The loss and its gradient are computed fused with the head by the array ops
(:mod:`fastopt.nn.ops`): :func:`batch_loss` picks the op for a :class:`Loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels.nn_cpu import HUBER, L1, MSE

__all__ = ["LOSSES", "Loss", "batch_loss"]


@dataclass(frozen=True)
class Loss:
    """One loss: its output ``head`` (softmax, sigmoid or identity), whether it is a
    ``classification`` loss (accuracy is its metric; else MAE and RMSE), whether the mean runs
    over every element (``per_element``; else over samples), whether targets are probabilities
    in [0, 1], the fewest outputs it needs, its regression kernel code and the torch function it
    matches."""

    name: str
    head: str
    classification: bool
    per_element: bool
    probability_targets: bool
    min_outputs: int
    reference: str
    regression_code: int | None = None


LOSSES = {
    loss.name: loss
    for loss in (
        Loss("cross_entropy", "softmax", True, False, True, 2, "cross_entropy"),
        Loss("kl_div", "softmax", True, False, True, 2, "kl_div(reduction='batchmean')"),
        Loss("bce", "sigmoid", True, True, True, 1, "binary_cross_entropy_with_logits"),
        Loss("mse", "identity", False, True, False, 1, "mse_loss", MSE),
        Loss("l1", "identity", False, True, False, 1, "l1_loss", L1),
        Loss("huber", "identity", False, True, False, 1, "huber_loss(delta=huber_delta)", HUBER),
    )
}
"""Every loss :class:`fastopt.nn.MLP` accepts, by name (the CLI and the scikit-learn estimators
read their choices from here)."""


def denominator(loss, n, n_outputs):
    """What the summed loss of ``n`` samples is divided by for its mean."""
    return n * n_outputs if loss.per_element else n


def batch_loss(loss, ops, Z, D, ws, *, labels, label_smoothing=0.0, huber_delta=1.0):
    """(loss sum, stat1, stat2) of the outputs ``Z`` (the workspace's last layer) against the
    workspace's targets (``ws.labels`` when ``labels``, else ``ws.T``); dLoss/dZ of the mean loss
    written into ``D``. stat1/stat2: #correct and 0 (classification), or sum |err| and sum err²."""
    n, k = Z.shape
    scale = 1.0 / denominator(loss, n, k)
    if loss.name == "cross_entropy" and labels:
        total, correct = ops.softmax_xent(
            Z, ws.labels, label_smoothing, scale, D, ws.row_loss, ws.row_correct
        )
        return total, correct, 0.0
    if loss.head == "softmax":  # probability targets: cross-entropy (smoothed as torch) or KL
        kl = loss.name == "kl_div"
        smoothing = 0.0 if kl else label_smoothing
        total, correct = ops.softmax_soft(
            Z, ws.T, kl, smoothing, scale, D, ws.row_loss, ws.row_correct
        )
        return total, correct, 0.0
    if loss.head == "sigmoid":
        total, correct = ops.sigmoid_bce(Z, ws.T, scale, D, ws.row_loss, ws.row_correct)
        return total, correct, 0.0
    return ops.regression(
        Z, ws.T, loss.regression_code, huber_delta, scale, D, ws.row_loss, ws.row_abs, ws.row_sq
    )
