"""Every update rule, written once, as plain scalar Python functions.

Each public rule has the signature ``rule(p, g, *state, h) -> (p, *state)``: one element of the
parameter, its gradient (after ``transformed_grad``) and its optimizer-state slots in, the new
values out. ``h`` is a tuple of per-step scalars computed on the host in float64 and cast to the
parameter dtype, so the arithmetic here stays in that dtype (no Python float literals in the math:
they would promote float32 to float64).

The fields of every ``h`` are declared once, next to the rule, with ``_declare_scalars``: the
optimizer classes return their scalars by these names (``fastopt.optim.base`` orders them into the
tuple), ``kernels/rules_layout.cuh`` gives the CUDA C one index macro per field
(``h[FO_ADAM_STEP_SIZE]``), and ``kernels/layout.py`` checks, before anything is compiled, that each
rule unpacks ``h`` (or a slice of it) into exactly the declared names in the declared order.

No decorators: ``kernels/compile_rules.py`` compiles this module twice (``numba.njit`` for the CPU
loops, ``numba.cuda.jit(device=True)`` for the GPU kernels) by rebinding the helpers below to their
compiled versions. ``kernels/rules.cuh`` is the same arithmetic in CUDA C for the CuPy kernels.

The arithmetic mirrors torch.optim's single-tensor implementations operation by operation (same
order, same lerp), so results agree with torch to rounding.
"""

import math

SCALARS = {}
"""Rule name -> the names of the fields of its scalar tuple ``h``, in order (rules in the order
the kernels are listed)."""

LAYOUTS = {}
"""Layout name -> field names: every declared layout, including shared prefixes that are no rule's
whole tuple (``adam_moments``). The CUDA C reads field ``f`` of layout ``l`` as ``h[FO_<L>_<F>]``."""


def _declare_scalars(layout, fields, rules=None):
    """Declare the scalar tuple ``fields`` (names, in order) under the name ``layout``, as the
    ``h`` of ``rules`` (default: the rule called ``layout``; ``()`` for a shared prefix).
    Returns ``fields``, for longer layouts that extend it."""
    fields = tuple(fields)
    if len(set(fields)) != len(fields) or layout in LAYOUTS:
        raise ValueError(f"scalar layout {layout!r} {fields} repeats a name or an existing layout")
    LAYOUTS[layout] = fields
    for rule in (layout,) if rules is None else rules:
        SCALARS[rule] = fields
    return fields


# ---------------------------------------------------------------------------------------------
# Shared pieces


def lerp(a, b, w, one_minus_w):
    """torch.lerp: ``a + w (b - a)`` for |w| < 0.5, else ``b - (b - a)(1 - w)``."""
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * one_minus_w


def clamp(x, lo, hi):
    """x limited to [lo, hi]; NaN stays NaN (as torch.clamp)."""
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


def transformed_grad(g, gscale, clip):
    """The gradient a rule sees: ``g * gscale``, then clipped to [-clip, clip] when ``clip > 0``.

    Every loop applies it, so gradient clipping by norm, averaging of accumulated micro-batches
    and loss-scale removal cost no extra pass (gscale = 1 and clip = 0 leave g bit-identical).
    """
    g = g * gscale
    if clip > 0:
        g = clamp(g, -clip, clip)
    return g


def maximum(a, b):
    """max(a, b) that propagates NaN from either side, as torch.maximum."""
    if a > b:
        return a
    if a <= b:
        return b
    return a + b


def l2_grad(p, g, gsign, weight_decay):
    """Gradient after ``maximize`` (gsign = -1) and coupled L2 weight decay ``g + wd * p``
    (skipped when wd = 0, as torch does: 0 * p would turn an infinite p into NaN)."""
    g = gsign * g
    if weight_decay != 0:
        g = g + weight_decay * p
    return g


def second_moment(v, g, beta, one_minus_beta):
    """``v * beta + ((1 - beta) * g) * g``, torch's ``v.mul_(beta).addcmul_(g, g, value=1 - beta)``,
    which scales ``g`` before squaring it: ``g * g`` first would overflow for |g| above
    ``sqrt(max)`` (1.8e19 in float32) where torch's value is finite (torch's addcmul is one fused
    multiply-add, ``fma((1 - beta) * g, g, v * beta)``: the same up to its last bit)."""
    return v * beta + (one_minus_beta * g) * g


def divide_by_scalar(x, c):
    """``x / c`` for a positive ``c`` that is the same for every element. The numba-cpu target
    replaces it with a bit-identical form without a division per element
    (``cpu_math.divide_by_scalar``)."""
    return x / c


# ---------------------------------------------------------------------------------------------
# SGD.  one_minus_dampening = 1 - dampening; nesterov, first (step 1): 1.0 or 0.0

SGD = _declare_scalars("sgd", ("lr", "weight_decay", "gsign"))
_declare_scalars("sgd_momentum", SGD + ("momentum", "one_minus_dampening", "nesterov", "first"))


def sgd(p, g, h):
    lr, weight_decay, gsign = h
    g = l2_grad(p, g, gsign, weight_decay)
    return (p - lr * g,)


def sgd_momentum(p, g, buf, h):
    lr, weight_decay, gsign, momentum, one_minus_dampening, nesterov, first = h
    g = l2_grad(p, g, gsign, weight_decay)
    if first > 0:
        buf = g
    else:
        buf = buf * momentum + one_minus_dampening * g
    if nesterov > 0:
        d = g + momentum * buf
    else:
        d = buf
    return p - lr * d, buf


# ---------------------------------------------------------------------------------------------
# Adagrad.  clr = lr / (1 + (t - 1) lr_decay)

_declare_scalars("adagrad", ("clr", "weight_decay", "gsign", "eps"))


def adagrad(p, g, acc, h):
    clr, weight_decay, gsign, eps = h
    g = l2_grad(p, g, gsign, weight_decay)
    acc = acc + g * g
    return p - clr * (g / (math.sqrt(acc) + eps)), acc


# ---------------------------------------------------------------------------------------------
# RMSprop. State order follows torch: square_avg, momentum_buffer (if momentum), grad_avg (if
# centered). The four variants share one layout.

_declare_scalars(
    "rmsprop",
    ("lr", "weight_decay", "gsign", "alpha", "one_minus_alpha", "eps", "momentum"),
    rules=("rmsprop", "rmsprop_momentum", "rmsprop_centered", "rmsprop_centered_momentum"),
)


def rmsprop(p, g, sq, h):
    lr, weight_decay, gsign, alpha, one_minus_alpha, eps, momentum = h
    g = l2_grad(p, g, gsign, weight_decay)
    sq = second_moment(sq, g, alpha, one_minus_alpha)
    return p - lr * (g / (math.sqrt(sq) + eps)), sq


def rmsprop_momentum(p, g, sq, buf, h):
    lr, weight_decay, gsign, alpha, one_minus_alpha, eps, momentum = h
    g = l2_grad(p, g, gsign, weight_decay)
    sq = second_moment(sq, g, alpha, one_minus_alpha)
    buf = buf * momentum + g / (math.sqrt(sq) + eps)
    return p - lr * buf, sq, buf


def rmsprop_centered(p, g, sq, gavg, h):
    lr, weight_decay, gsign, alpha, one_minus_alpha, eps, momentum = h
    g = l2_grad(p, g, gsign, weight_decay)
    sq = second_moment(sq, g, alpha, one_minus_alpha)
    gavg = lerp(gavg, g, one_minus_alpha, alpha)
    return p - lr * (g / (math.sqrt(sq - gavg * gavg) + eps)), sq, gavg


def rmsprop_centered_momentum(p, g, sq, buf, gavg, h):
    lr, weight_decay, gsign, alpha, one_minus_alpha, eps, momentum = h
    g = l2_grad(p, g, gsign, weight_decay)
    sq = second_moment(sq, g, alpha, one_minus_alpha)
    gavg = lerp(gavg, g, one_minus_alpha, alpha)
    buf = buf * momentum + g / (math.sqrt(sq - gavg * gavg) + eps)
    return p - lr * buf, sq, buf, gavg


# ---------------------------------------------------------------------------------------------
# Adadelta.

_declare_scalars("adadelta", ("lr", "weight_decay", "gsign", "rho", "one_minus_rho", "eps"))


def adadelta(p, g, sq, acc_delta, h):
    lr, weight_decay, gsign, rho, one_minus_rho, eps = h
    g = l2_grad(p, g, gsign, weight_decay)
    sq = second_moment(sq, g, rho, one_minus_rho)
    delta = math.sqrt(acc_delta + eps) / math.sqrt(sq + eps) * g
    acc_delta = second_moment(acc_delta, delta, rho, one_minus_rho)
    return p - lr * delta, sq, acc_delta


# ---------------------------------------------------------------------------------------------
# Adam / AdamW. decay = 1 - lr * wd for decoupled (AdamW) weight decay, else 1 with weight_decay
# the L2 term. ADAM_MOMENTS is the prefix of every rule built on adam_moments.
# step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t).

ADAM_MOMENTS = _declare_scalars(
    "adam_moments",
    ("decay", "weight_decay", "gsign", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2"),
    rules=(),
)
_declare_scalars(
    "adam",
    ADAM_MOMENTS + ("step_size", "bias_correction2_sqrt", "eps"),
    rules=("adam", "adam_amsgrad"),
)


def adam_moments(p, g, m, v, h):
    """Decay, L2 term and both moments; returns the effective gradient too."""
    decay, weight_decay, gsign, beta1, one_minus_beta1, beta2, one_minus_beta2 = h[:7]
    p = p * decay
    g = l2_grad(p, g, gsign, weight_decay)
    return p, g, lerp(m, g, one_minus_beta1, beta1), second_moment(v, g, beta2, one_minus_beta2)


def adam_apply(p, m, v, h):
    step_size, bias_correction2_sqrt, eps = h[7:]
    return p - step_size * (m / (math.sqrt(v) / bias_correction2_sqrt + eps))


def adam(p, g, m, v, h):
    p, g, m, v = adam_moments(p, g, m, v, h)
    return adam_apply(p, m, v, h), m, v


def adam_amsgrad(p, g, m, v, vmax, h):
    p, g, m, v = adam_moments(p, g, m, v, h)
    vmax = maximum(vmax, v)
    return adam_apply(p, m, vmax, h), m, v, vmax


# ---------------------------------------------------------------------------------------------
# Adamax.  clr = lr / (1 - beta1^t)

_declare_scalars(
    "adamax", ("weight_decay", "gsign", "beta1", "one_minus_beta1", "beta2", "eps", "clr")
)


def adamax(p, g, m, u, h):
    weight_decay, gsign, beta1, one_minus_beta1, beta2, eps, clr = h
    g = l2_grad(p, g, gsign, weight_decay)
    m = lerp(m, g, one_minus_beta1, beta1)
    u = maximum(u * beta2, abs(g) + eps)
    return p - clr * (m / u), m, u


# ---------------------------------------------------------------------------------------------
# NAdam.  bias_correction2 = 1 - beta2^t,
# c_grad = lr (1 - mu_t) / (1 - prod mu_1..t), c_avg = lr mu_{t+1} / (1 - prod mu_1..t+1)

_declare_scalars("nadam", ADAM_MOMENTS + ("bias_correction2", "eps", "c_grad", "c_avg"))


def nadam(p, g, m, v, h):
    p, g, m, v = adam_moments(p, g, m, v, h)
    bias_correction2, eps, c_grad, c_avg = h[7:]
    denom = math.sqrt(v / bias_correction2) + eps
    p = p - c_grad * (g / denom)
    return p - c_avg * (m / denom), m, v


# ---------------------------------------------------------------------------------------------
# RAdam.  rectify > 0 when rho_t > 5 (the variance is tractable); rect is the rectification
# term r_t; bias_correction1 = 1 - beta1^t, bias_correction2_sqrt = sqrt(1 - beta2^t).

_declare_scalars(
    "radam",
    ADAM_MOMENTS + ("bias_correction1", "lr", "rectify", "rect", "bias_correction2_sqrt", "eps"),
)


def radam(p, g, m, v, h):
    p, g, m, v = adam_moments(p, g, m, v, h)
    bias_correction1, lr, rectify, rect, bias_correction2_sqrt, eps = h[7:]
    m_hat = m / bias_correction1
    if rectify > 0:
        p = p - m_hat * lr * (bias_correction2_sqrt / (math.sqrt(v) + eps)) * rect
    else:
        p = p - m_hat * lr
    return p, m, v


# ---------------------------------------------------------------------------------------------
# Rprop.  zero is 0.0 (a literal would promote float32 to float64).

_declare_scalars(
    "rprop", ("gsign", "etaminus", "etaplus", "step_size_min", "step_size_max", "zero")
)


def rprop(p, g, prev, step_size, h):
    gsign, etaminus, etaplus, step_size_min, step_size_max, zero = h
    g = gsign * g
    same_direction = g * prev
    if same_direction > 0:
        step_size = clamp(step_size * etaplus, step_size_min, step_size_max)
    elif same_direction < 0:
        step_size = clamp(step_size * etaminus, step_size_min, step_size_max)
        g = zero
    else:
        step_size = clamp(step_size, step_size_min, step_size_max)
    if g > 0:
        p = p - step_size
    elif g < 0:
        p = p + step_size
    return p, g, step_size


# ---------------------------------------------------------------------------------------------
# Yogi (Zaheer et al., NeurIPS 2018). step_size = lr and bias_correction2_sqrt = 1 give the
# paper's update; lr / (1 - beta1^t) and sqrt(1 - beta2^t) give optax.yogi's bias-corrected one
# (dividing by 1 is exact, so the paper's form loses no bits to the shared code).

_declare_scalars(
    "yogi",
    (
        "step_size",
        "weight_decay",
        "gsign",
        "beta1",
        "one_minus_beta1",
        "one_minus_beta2",
        "bias_correction2_sqrt",
        "eps",
    ),
)


def yogi(p, g, m, v, h):
    (step_size, weight_decay, gsign, beta1, one_minus_beta1, one_minus_beta2,
     bias_correction2_sqrt, eps) = h  # fmt: skip
    g = l2_grad(p, g, gsign, weight_decay)
    m = one_minus_beta1 * g + beta1 * m
    g2 = g * g
    if v > g2:
        v = v - one_minus_beta2 * g2
    elif v < g2:
        v = v + one_minus_beta2 * g2
    return p - step_size * (m / (math.sqrt(v) / bias_correction2_sqrt + eps)), m, v


# ---------------------------------------------------------------------------------------------
# Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"; optax.lion).
# decay = 1 - lr * wd (decoupled weight decay)

_declare_scalars(
    "lion", ("decay", "lr", "gsign", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2")
)


def lion(p, g, m, h):
    decay, lr, gsign, beta1, one_minus_beta1, beta2, one_minus_beta2 = h
    g = gsign * g
    c = beta1 * m + one_minus_beta1 * g
    p = p * decay
    if c > 0:
        p = p - lr
    elif c < 0:
        p = p + lr
    return p, beta2 * m + one_minus_beta2 * g


# ---------------------------------------------------------------------------------------------
# Exponential moving average of parameters (Polyak averaging), torch.optim.swa_utils'
# get_ema_multi_avg_fn: ``ema.lerp_(param, 1 - decay)``. The averaged copy takes the parameter
# slot and the parameter the gradient slot.

_declare_scalars("ema", ("one_minus_decay", "decay"))


def ema(avg, p, h):
    one_minus_decay, decay = h
    return (lerp(avg, p, one_minus_decay, decay),)


# ---------------------------------------------------------------------------------------------
# Per-segment rules (one value per parameter tensor: LAMB, LARS, NovoGrad), run by the templates
# of ``kernels/segment_loops.py`` over a ParamSet's segments. Each has three functions:
#   ``<rule>_pre(p, g, *state, h, flags) -> (x, y)``: the two values whose squares the segmented
#       reduction sums over each segment (read only: nothing is written in that pass);
#   ``<rule>_segment(sx, sy, flags, st, h) -> (r0, r1, st)``: the segment's scalars from the two
#       float64 sums (and its scalar state ``st``), once per segment;
#   ``<rule>(p, g, *state, h, flags, r0, r1) -> (p, *state)``: the elementwise update.
# ``flags`` are the segment's bits: FLAG_DECAY (weight decay applies), FLAG_TRUST (trust ratio
# applies). Their layouts are declared with ``rules=()``: they are no elementwise rule (RULES).

FLAG_DECAY = 1
FLAG_TRUST = 2

_declare_scalars("segment_norms", ("gsign",), rules=())


def segment_norms_pre(p, g, h, flags):
    """The parameter and the gradient: their per-segment sums of squares."""
    (gsign,) = h
    return p, gsign * g


def segment_norms_segment(sx, sy, flags, st, h):
    """The two sums themselves."""
    (gsign,) = h
    return sx, sy, st


def trust_ratio(param_norm, update_norm, trust_coefficient, eps):
    """optax.scale_by_trust_ratio: ``tc * |p| / (|u| + eps)``, 1 when either norm is 0."""
    if param_norm == 0.0 or update_norm == 0.0:
        return 1.0
    return trust_coefficient * param_norm / (update_norm + eps)


# LAMB (You et al., ICLR 2020; optax.lamb = scale_by_adam, add_decayed_weights,
# scale_by_trust_ratio, scale_by_learning_rate). bias_correction{1,2} = 1 - beta{1,2}^t.

_declare_scalars(
    "lamb",
    ("gsign", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "bias_correction1",
     "bias_correction2", "eps", "eps_root", "weight_decay", "lr"),
    rules=(),
)  # fmt: skip


def lamb_direction(p, g, m, v, h, flags):
    """(update before the trust ratio, new m, new v): optax's Adam direction plus wd * p."""
    (gsign, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction1, bias_correction2,
     eps, eps_root, weight_decay, lr) = h  # fmt: skip
    g = gsign * g
    m = one_minus_beta1 * g + beta1 * m
    v = one_minus_beta2 * (g * g) + beta2 * v
    # optax's (m / bc1) / (sqrt(v / bc2 + eps_root) + eps) with one division fewer (the
    # divider bounds the CPU loop): the same value up to rounding.
    v_hat = divide_by_scalar(v, bias_correction2)
    u = m / (bias_correction1 * (math.sqrt(v_hat + eps_root) + eps))
    if flags & FLAG_DECAY and weight_decay != 0:
        u = u + weight_decay * p
    return u, m, v


def lamb_pre(p, g, m, v, h, flags):
    u, m, v = lamb_direction(p, g, m, v, h, flags)
    return p, u


def lamb_segment(sx, sy, flags, st, h):
    """r0 = lr * trust ratio of the segment."""
    (gsign, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction1, bias_correction2,
     eps, eps_root, weight_decay, lr) = h  # fmt: skip
    return lr * trust_ratio(math.sqrt(sx), math.sqrt(sy), 1.0, 0.0), 0.0, st


def lamb(p, g, m, v, h, flags, r0, r1):
    u, m, v = lamb_direction(p, g, m, v, h, flags)
    return p - r0 * u, m, v


def lamb_stored(p, g, m, v, h, flags):
    """(update, new m, new v): what the CPU's stored-update loops keep (``STORED_UPDATE``)."""
    return lamb_direction(p, g, m, v, h, flags)


# LARS (You et al., 2017; optax.lars = add_decayed_weights (masked), scale_by_trust_ratio
# (masked), scale_by_learning_rate, trace). nesterov: 1.0 or 0.0.

_declare_scalars(
    "lars",
    ("gsign", "weight_decay", "trust_coefficient", "eps", "lr", "momentum", "nesterov"),
    rules=(),
)


def lars_pre(p, g, h, flags):
    """The parameter and the update ``g + wd * p`` (wd where FLAG_DECAY is set)."""
    gsign, weight_decay, trust_coefficient, eps, lr, momentum, nesterov = h
    u = gsign * g
    if flags & FLAG_DECAY and weight_decay != 0:
        u = u + weight_decay * p
    return p, u


def lars_segment(sx, sy, flags, st, h):
    """r0 = lr * trust ratio (lr alone where FLAG_TRUST is clear)."""
    gsign, weight_decay, trust_coefficient, eps, lr, momentum, nesterov = h
    if flags & FLAG_TRUST:
        return lr * trust_ratio(math.sqrt(sx), math.sqrt(sy), trust_coefficient, eps), 0.0, st
    return lr * 1.0, 0.0, st


def lars(p, g, buf, h, flags, r0, r1):
    """optax.trace on the scaled update s: buf = s + momentum * buf; the step is buf, or
    s + momentum * buf with Nesterov."""
    p, u = lars_pre(p, g, h, flags)
    gsign, weight_decay, trust_coefficient, eps, lr, momentum, nesterov = h
    s = r0 * u
    buf = s + momentum * buf
    if nesterov > 0:
        return p - (s + momentum * buf), buf
    return p - buf, buf


# NovoGrad (Ginsburg et al., 2019; optax.novograd = scale_by_novograd, scale_by_learning_rate).
# Per segment nu = |g|^2 at step 1, else beta2 * nu + (1 - beta2) |g|^2; first: 1.0 at step 1.

_declare_scalars(
    "novograd",
    ("gsign", "beta1", "beta2", "one_minus_beta2", "eps", "eps_root", "weight_decay", "lr",
     "first"),
    rules=(),
)  # fmt: skip


def novograd_pre(p, g, h, flags):
    """The gradient (twice: only its sum of squares is used)."""
    gsign, beta1, beta2, one_minus_beta2, eps, eps_root, weight_decay, lr, first = h
    g = gsign * g
    return g, g


def novograd_segment(sx, sy, flags, nu, h):
    """(sqrt(nu + eps_root) + eps, 0, new nu)."""
    gsign, beta1, beta2, one_minus_beta2, eps, eps_root, weight_decay, lr, first = h
    if first > 0:
        nu = sx
    else:
        nu = one_minus_beta2 * sx + beta2 * nu
    return math.sqrt(nu + eps_root) + eps, 0.0, nu


def novograd(p, g, m, h, flags, r0, r1):
    gsign, beta1, beta2, one_minus_beta2, eps, eps_root, weight_decay, lr, first = h
    u = (gsign * g) / r0
    if flags & FLAG_DECAY and weight_decay != 0:
        u = u + weight_decay * p
    if first == 0:
        u = beta1 * m + u
    return p - lr * u, u


SEGMENT_RULES = {"segment_norms": 0, "lamb": 2, "lars": 1, "novograd": 1}
"""Per-segment rule -> number of element state slots of its update (its ``_pre`` takes as many,
or none: see ``kernels/segment_loops.py``)."""
STORED_UPDATE = ("lamb",)
"""Per-segment rules whose ``_pre`` returns ``(p, y)`` and whose update is ``p - r0 * y`` with the
state ``<rule>_stored(p, g, *state, h, flags) -> (y, *new state)`` computes: the CPU computes ``y``
once, in the reduction, and applies it from a scratch buffer (``segment_loops``)."""
# ASGD (torch.optim.ASGD; Polyak & Juditsky 1992). eta and mu are the values torch keeps in the
# state from the previous step: decay = 1 - lambd * eta; average = 0.0 while mu = 1 (ax copies
# the parameter), else 1.0 (ax moves toward it by mu).

_declare_scalars("asgd", ("decay", "eta", "weight_decay", "gsign", "mu", "average"))


def asgd(p, g, ax, h):
    decay, eta, weight_decay, gsign, mu, average = h
    g = l2_grad(p, g, gsign, weight_decay)
    p = p * decay
    p = p - eta * g
    if average > 0:
        ax = ax + (p - ax) * mu
    else:
        ax = p
    return p, ax


# ---------------------------------------------------------------------------------------------
# Schedule-free SGD and AdamW (Defazio et al., "The Road Less Scheduled", 2024; the schedulefree
# package's SGDScheduleFree / AdamWScheduleFree). The parameter holds the gradient point y, the
# state z; ckp1 = c_{k+1} is the averaging weight, y_step = lr (beta1 (1 - ckp1) - 1) (beta1 is
# SGD's momentum), lr the warmed-up learning rate, bias_correction2 = 1 - beta2^t.

SCHEDULEFREE = _declare_scalars(
    "schedulefree", ("lr", "weight_decay", "ckp1", "one_minus_ckp1", "y_step"), rules=()
)
_declare_scalars("sf_sgd", SCHEDULEFREE)
_declare_scalars("sf_adamw", SCHEDULEFREE + ("beta2", "one_minus_beta2", "bias_correction2", "eps"))


def schedulefree_apply(y, g, z, h):
    """The y/z update of both: weight decay at y, y <- lerp(y, z, ckp1) + y_step g, z <- z - lr g."""
    lr, weight_decay, ckp1, one_minus_ckp1, y_step = h[:5]
    if weight_decay != 0:
        g = g + weight_decay * y
    y = lerp(y, z, ckp1, one_minus_ckp1)
    return y + y_step * g, z - lr * g


def sf_sgd(y, g, z, h):
    return schedulefree_apply(y, g, z, h)


def sf_adamw(y, g, z, v, h):
    beta2, one_minus_beta2, bias_correction2, eps = h[5:]
    v = second_moment(v, g, beta2, one_minus_beta2)
    y, z = schedulefree_apply(y, g / (math.sqrt(v / bias_correction2) + eps), z, h)
    return y, z, v


RULES = tuple(SCALARS)
"""The public rules, in the order the kernels are listed; everything else here is a helper."""
