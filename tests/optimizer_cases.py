"""Every optimizer and flag combination, as (id, class, kwargs): shared by the core tests."""

import fastopt as fo

CASES = [
    ("sgd", fo.SGD, dict(lr=0.05)),
    ("sgd_wd_max", fo.SGD, dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("sgd_momentum", fo.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd_dampening", fo.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("sgd_nesterov", fo.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adagrad", fo.Adagrad, dict(lr=0.1)),
    (
        "adagrad_all",
        fo.Adagrad,
        dict(
            lr=0.1,
            lr_decay=0.01,
            weight_decay=0.05,
            initial_accumulator_value=0.1,
            eps=1e-8,
            maximize=True,
        ),
    ),
    ("rmsprop", fo.RMSprop, dict(lr=0.01)),
    ("rmsprop_centered", fo.RMSprop, dict(lr=0.01, centered=True, weight_decay=0.01)),
    ("rmsprop_momentum", fo.RMSprop, dict(lr=0.01, momentum=0.9, maximize=True)),
    (
        "rmsprop_centered_momentum",
        fo.RMSprop,
        dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5),
    ),
    ("adadelta", fo.Adadelta, dict()),
    ("adadelta_wd", fo.Adadelta, dict(lr=0.5, rho=0.95, weight_decay=0.01, maximize=True)),
    ("adam", fo.Adam, dict(lr=0.01)),
    ("adam_amsgrad_wd", fo.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    (
        "adam_max_decoupled",
        fo.Adam,
        dict(
            lr=0.01, betas=(0.8, 0.99), maximize=True, decoupled_weight_decay=True, weight_decay=0.1
        ),
    ),
    ("adam_beta1_small", fo.Adam, dict(lr=0.01, betas=(0.3, 0.9))),
    ("adamw", fo.AdamW, dict(lr=0.01)),
    ("adamw_amsgrad", fo.AdamW, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("adamax", fo.Adamax, dict(lr=0.01, weight_decay=0.01)),
    ("nadam", fo.NAdam, dict(lr=0.01)),
    (
        "nadam_decoupled",
        fo.NAdam,
        dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01, decoupled_weight_decay=True),
    ),
    ("radam", fo.RAdam, dict(lr=0.01, weight_decay=0.01)),
    ("radam_decoupled", fo.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("rprop", fo.Rprop, dict(lr=0.01)),
    (
        "rprop_custom",
        fo.Rprop,
        dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-4, 0.2), maximize=True),
    ),
    ("yogi", fo.Yogi, dict(lr=0.01)),
    ("yogi_wd", fo.Yogi, dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.01, maximize=True)),
    ("yogi_bias_correction", fo.Yogi, dict(lr=0.01, bias_correction=True)),
    ("lion", fo.Lion, dict(lr=0.001)),
    ("lion_wd", fo.Lion, dict(lr=0.001, weight_decay=0.1, maximize=True)),
    ("asgd", fo.ASGD, dict(lr=0.05)),
    ("asgd_averaging", fo.ASGD, dict(lr=0.05, lambd=0.01, t0=2, weight_decay=0.01, maximize=True)),
    ("sgd_schedulefree", fo.SGDScheduleFree, dict(lr=0.1)),
    (
        "sgd_schedulefree_all",
        fo.SGDScheduleFree,
        dict(lr=0.1, momentum=0.8, weight_decay=0.01, warmup_steps=3, r=0.5, weight_lr_power=1.0),
    ),
    ("adamw_schedulefree", fo.AdamWScheduleFree, dict(lr=0.01)),
    (
        "adamw_schedulefree_all",
        fo.AdamWScheduleFree,
        dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01, warmup_steps=4, r=1.0),
    ),
]


def grad_of(params, t, seed=0):
    """A gradient that depends on the parameters (so trajectories interact) plus fixed noise."""
    import numpy as np

    rng = np.random.default_rng(seed + t)
    out = []
    for p in params:
        noise = rng.standard_normal(p.shape).astype(p.dtype)
        g = (p - 0.5) * np.asarray(0.3, p.dtype) + np.asarray(0.1, p.dtype) * noise
        if t % 7 == 3:  # sign flips and exact zeros exercise Rprop/Lion/Yogi branches
            g = -g
            g.reshape(-1)[::5] = 0
        out.append(g)
    return out
