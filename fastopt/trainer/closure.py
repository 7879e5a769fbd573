"""The closure a closure-driven optimizer (:class:`fastopt.optim.LBFGS`) re-evaluates: an MLP's
mean loss on a fixed set of rows, with its gradient written into the model's ParamSet.

L2 weight decay cannot ride on such an optimizer (it has no ``weight_decay``), so it is part of
the objective here: ``loss + weight_decay/2 * |W|^2`` over the weights only (biases and
batch-norm parameters are not decayed), gradient ``+ weight_decay * W``: the same regularised
problem the other optimizers' coupled ``weight_decay`` on the weights solves.
"""

import numpy as np

from ..kernels import vector


def mlp_closure(model, X, y, idx, *, weight_decay=0.0, train=True, rng=None):
    """``closure()`` -> the mean loss over rows ``idx`` of checked ``X``/``y`` plus the L2 term,
    its gradient in ``model.params.grads``. ``closure.first`` holds the (loss sum, stat1,
    stat2) of its first evaluation (the epoch metrics of the Trainer)."""
    n_w = model.n_weights
    denominator = model.loss_denominator(len(idx))

    def closure():
        out = model.batch_loss_and_grad(X, y, idx, train=train, rng=rng)
        if closure.first is None:
            closure.first = out
        loss = float(out[0]) / denominator
        if weight_decay:
            w = model.params.flat[:n_w]
            g = model.params.grad_flat[:n_w]
            loss += 0.5 * weight_decay * vector.dot(w, w)
            g += np.asarray(weight_decay, g.dtype) * w
        return loss

    closure.first = None
    return closure


def closure_step(opt, model, X, y, idx, weight_decay, rng):
    """One ``opt.step(closure)`` on rows ``idx`` (the Trainer's step with a closure optimizer);
    returns the first evaluation's (loss sum, stat1, stat2) for the epoch metrics. A non-finite
    first loss is returned (the Trainer reports the divergence) rather than raised."""
    closure = mlp_closure(model, X, y, idx, weight_decay=weight_decay, train=True, rng=rng)
    try:
        opt.step(closure)
    except ValueError:
        if closure.first is None or np.isfinite(closure.first[0]):
            raise
    return closure.first


def check_closure_optimizer(optimizer, model, weight_decay, several_processes, clip):
    """A closure optimizer (LBFGS) re-evaluates the batch in its step: one process, over the
    model's whole ParamSet, no clipping (the step is not a function of one gradient)."""
    name = optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__
    if several_processes:
        raise ValueError(f"{name} (a closure optimizer) runs without distributed= and zero=")
    if any(v is not None and v is not False for v in clip.values()):
        raise ValueError(f"{name} takes no max_grad_norm / max_grad_value / skip_nonfinite")
    if not isinstance(optimizer, type):
        if weight_decay:
            raise ValueError(f"weight_decay with a {name} instance: pass the class instead")
        if optimizer.sources() != [model.params]:
            raise ValueError(f"a {name} instance must be built over model.params")
