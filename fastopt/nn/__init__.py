"""A multilayer perceptron whose weights and biases live in one :class:`~fastopt.ParamSet`.

::

    import fastopt as fo
    from fastopt.nn import MLP

    model = MLP(64, (128, 128), 10, activation="relu", loss="cross_entropy", seed=0)
    model.fit_standardizer(X_train)               # input standardization, fitted on training data
    opt = fo.Adam(model.param_groups(weight_decay=1e-4), lr=1e-3)
    loss = model.loss_and_grad(X_batch, y_batch)  # forward + backward into model.params.grads
    opt.step(model.grads_for(opt))                 # or opt = fo.Adam(model.params); opt.step()
    proba = model.predict(X_test)

Layers: ``Linear -> [BatchNorm] -> activation -> [Dropout]`` for every hidden layer, then a
linear output layer whose *head* is fixed by the loss (softmax for cross_entropy and kl_div,
sigmoid for bce, identity for mse, l1 and huber: see :mod:`fastopt.nn.losses`).

Activations: relu, leaky_relu (``negative_slope``), elu (``elu_alpha``), gelu (exact, erf),
tanh, sigmoid, identity. Initializers: zeros, normal (std 0.01), xavier/glorot normal and
uniform, kaiming/he normal and uniform, lecun normal and uniform, orthogonal, or a callable
``init(fan_in, fan_out, rng) -> array``; ``"auto"`` is Kaiming uniform for the relu family and
Xavier uniform otherwise (the output layer always Xavier uniform). Biases start at zero.
L2 regularization is the optimizer's ``weight_decay``; :meth:`MLP.param_groups` puts it on the
weights only.

The matrix products go to BLAS through the array module's ``matmul`` (NumPy's BLAS; CuPy's
cuBLAS for ``device="cuda"``); everything elementwise (bias + activation + dropout, activation
backward + bias gradient, the fused softmax/sigmoid losses, batch norm) is one fused Numba
kernel per layer (``fastopt.kernels.nn_cpu``) on the CPU, or whole-array expressions
(:mod:`fastopt.nn.ops`).

Modules: :mod:`~fastopt.nn.model` (the MLP), :mod:`~fastopt.nn.activations` and
:mod:`~fastopt.nn.losses` (one registry each, name -> definition), :mod:`~fastopt.nn.init`
(initializers, gains), :mod:`~fastopt.nn.ops` (the array ops), :mod:`~fastopt.nn.data` (input
and target checks), :mod:`~fastopt.nn.groups` (weight-decay param groups),
:mod:`~fastopt.nn.workspace` (preallocated intermediates).
"""

from .activations import ACTIVATIONS, Activation
from .init import INITIALIZERS, gain, initialize
from .losses import LOSSES, Loss
from .model import MLP

__all__ = [
    "ACTIVATIONS",
    "INITIALIZERS",
    "LOSSES",
    "MLP",
    "Activation",
    "Loss",
    "gain",
    "initialize",
]
