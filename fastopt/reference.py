"""NumPy whole-array update rules: the readable specification and the test oracle.

Each function updates ``param`` and the arrays in ``state`` in place for one step, where ``step`` is
the 1-based count of steps including this one. Hyperparameters have torch.optim's names and
meanings; the operations follow torch.optim's single-tensor implementations (eps placement, bias
correction, lerp, weight decay) so this file can be read side by side with torch's source. Python
float hyperparameters never promote float32 arrays (NumPy >= 2 weak scalars), so float32 stays
float32. Kept free of the kernels' host-side scalar folding on purpose: it is an independent oracle.
Every hyperparameter is passed (the optimizer classes own torch's defaults; the ``numpy`` backend
passes a group's full set).
"""

import math

import numpy as np


def _lerp(a, b, w):
    """torch.lerp(a, b, w) for a scalar weight (its two-branch formula)."""
    if abs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (1.0 - w)


def transformed_grad(grad, scale, clip):
    """The gradient the update sees: ``grad * scale`` (norm clipping, micro-batch averaging,
    loss-scale removal), then clipped elementwise to [-clip, clip] when ``clip > 0``."""
    g = grad * grad.dtype.type(scale)
    if clip > 0:
        g = np.clip(g, -clip, clip).astype(grad.dtype)
    return g


def _grad(param, grad, maximize, weight_decay):
    g = -grad if maximize else grad
    return g + weight_decay * param if weight_decay != 0 else g


def _adam_moments(param, grad, state, lr, betas, weight_decay, decoupled, maximize):
    """Weight decay (decoupled: θ ← θ(1 − ηλ); else g ← g + λθ) and the two Adam moments, in place:
    m ← lerp(m, g, 1 − β₁), v ← β₂ v + (1 − β₂) g². Returns (g, m, v)."""
    beta1, beta2 = betas
    if decoupled and weight_decay != 0:
        param[...] = param * (1 - lr * weight_decay)
        weight_decay = 0.0
    g = _grad(param, grad, maximize, weight_decay)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = _lerp(m, g, 1 - beta1)
    v[...] = v * beta2 + ((1 - beta2) * g) * g
    return g, m, v


def sgd(
    param,
    grad,
    state,
    *,
    step,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
):
    r"""SGD with momentum (torch.optim.SGD; Sutskever et al. 2013 form).

    g = ∇ + λθ;  b₁ = g,  b_t = μ b_{t-1} + (1 − τ) g;  d = g + μ b_t (Nesterov) or b_t;  θ ← θ − η d
    """
    g = _grad(param, grad, maximize, weight_decay)
    if momentum != 0:
        buf = state["momentum_buffer"]
        if step == 1:
            buf[...] = g
        else:
            buf[...] = buf * momentum + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    param[...] = param - lr * g


def adagrad(
    param,
    grad,
    state,
    *,
    step,
    lr,
    lr_decay,
    weight_decay,
    initial_accumulator_value,
    eps,
    maximize,
):
    r"""Adagrad (Duchi et al. 2011; torch.optim.Adagrad).

    η_t = η / (1 + (t − 1) δ);  s ← s + g²;  θ ← θ − η_t g / (√s + ε)
    """
    g = _grad(param, grad, maximize, weight_decay)
    clr = lr / (1 + (step - 1) * lr_decay)
    s = state["sum"]
    s[...] = s + g * g
    param[...] = param - clr * (g / (np.sqrt(s) + eps))


def rmsprop(
    param,
    grad,
    state,
    *,
    step,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
):
    r"""RMSprop (Hinton's lecture 6e; Graves 2013 centered form; torch.optim.RMSprop).

    v ← α v + (1 − α) g²;  centered: ḡ ← lerp(ḡ, g, 1 − α), v̂ = v − ḡ²;  a = √v̂ + ε;
    momentum: b ← μ b + g / a, θ ← θ − η b;  else θ ← θ − η g / a
    """
    g = _grad(param, grad, maximize, weight_decay)
    sq = state["square_avg"]
    sq[...] = sq * alpha + ((1 - alpha) * g) * g
    if centered:
        ga = state["grad_avg"]
        ga[...] = _lerp(ga, g, 1 - alpha)
        avg = np.sqrt(sq - ga * ga) + eps
    else:
        avg = np.sqrt(sq) + eps
    if momentum > 0:
        buf = state["momentum_buffer"]
        buf[...] = buf * momentum + g / avg
        param[...] = param - lr * buf
    else:
        param[...] = param - lr * (g / avg)


def adadelta(param, grad, state, *, step, lr, rho, eps, weight_decay, maximize):
    r"""Adadelta (Zeiler 2012; torch.optim.Adadelta).

    v ← ρ v + (1 − ρ) g²;  Δ = √(u + ε) / √(v + ε) · g;  u ← ρ u + (1 − ρ) Δ²;  θ ← θ − η Δ
    """
    g = _grad(param, grad, maximize, weight_decay)
    sq, acc = state["square_avg"], state["acc_delta"]
    sq[...] = sq * rho + ((1 - rho) * g) * g
    delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
    acc[...] = acc * rho + ((1 - rho) * delta) * delta
    param[...] = param - lr * delta


def adam(
    param,
    grad,
    state,
    *,
    step,
    lr,
    betas,
    eps,
    weight_decay,
    amsgrad,
    maximize,
    decoupled_weight_decay,
):
    r"""Adam / AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019; torch.optim.Adam/AdamW).

    AdamW: θ ← θ(1 − ηλ); Adam: g ← g + λθ.  m ← lerp(m, g, 1 − β₁);  v ← β₂ v + (1 − β₂) g²;
    AMSGrad: v̂ ← max(v̂, v).  θ ← θ − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
    """
    beta1, beta2 = betas
    g, m, v = _adam_moments(
        param, grad, state, lr, betas, weight_decay, decoupled_weight_decay, maximize
    )
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if amsgrad:
        vmax = state["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)
        v = vmax
    param[...] = param - step_size * (m / (np.sqrt(v) / bias_correction2_sqrt + eps))


def adamax(
    param,
    grad,
    state,
    *,
    step,
    lr,
    betas,
    eps,
    weight_decay,
    maximize,
):
    r"""Adamax (Kingma & Ba 2015, §7.1; torch.optim.Adamax).

    m ← lerp(m, g, 1 − β₁);  u ← max(β₂ u, |g| + ε);  θ ← θ − η / (1 − β₁ᵗ) · m / u
    """
    beta1, beta2 = betas
    g = _grad(param, grad, maximize, weight_decay)
    m, u = state["exp_avg"], state["exp_inf"]
    m[...] = _lerp(m, g, 1 - beta1)
    np.maximum(u * beta2, np.abs(g) + eps, out=u)
    clr = lr / (1 - beta1**step)
    param[...] = param - clr * (m / u)


def nadam(
    param,
    grad,
    state,
    *,
    step,
    lr,
    betas,
    eps,
    weight_decay,
    momentum_decay,
    decoupled_weight_decay,
    maximize,
):
    r"""NAdam (Dozat 2016; torch.optim.NAdam), with the momentum schedule of torch.

    μ_t = β₁(1 − ½·0.96^{tψ});  Π_t = Π_{t−1} μ_t  (``state["mu_product"]``, updated here);
    θ ← θ − η(1 − μ_t)/(1 − Π_t) · g/d − η μ_{t+1}/(1 − Π_t μ_{t+1}) · m/d,  d = √(v/(1 − β₂ᵗ)) + ε
    """
    beta1, beta2 = betas
    g, m, v = _adam_moments(
        param, grad, state, lr, betas, weight_decay, decoupled_weight_decay, maximize
    )
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product = state["mu_product"] * mu
    state["mu_product"] = mu_product
    denom = np.sqrt(v / (1 - beta2**step)) + eps
    p = param - (lr * (1.0 - mu) / (1.0 - mu_product)) * (g / denom)
    param[...] = p - (lr * mu_next / (1.0 - mu_product * mu_next)) * (m / denom)


def radam(
    param,
    grad,
    state,
    *,
    step,
    lr,
    betas,
    eps,
    weight_decay,
    decoupled_weight_decay,
    maximize,
):
    r"""RAdam (Liu et al. 2020; torch.optim.RAdam).

    ρ_∞ = 2/(1 − β₂) − 1,  ρ_t = ρ_∞ − 2tβ₂ᵗ/(1 − β₂ᵗ).  m̂ = m/(1 − β₁ᵗ).  If ρ_t > 5:
    θ ← θ − η m̂ · √(1 − β₂ᵗ)/(√v + ε) · r_t,  r_t = √((ρ_t−4)(ρ_t−2)ρ_∞ / ((ρ_∞−4)(ρ_∞−2)ρ_t));
    else θ ← θ − η m̂ (un-adapted momentum step)
    """
    beta1, beta2 = betas
    g, m, v = _adam_moments(
        param, grad, state, lr, betas, weight_decay, decoupled_weight_decay, maximize
    )
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    m_hat = m / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if rho_t > 5.0:
        rect = math.sqrt(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )
        adaptive = math.sqrt(bias_correction2) / (np.sqrt(v) + eps)
        param[...] = param - m_hat * lr * adaptive * rect
    else:
        param[...] = param - m_hat * lr


def rprop(param, grad, state, *, step, lr, etas, step_sizes, maximize):
    r"""Rprop (Riedmiller & Braun 1993, the "Rprop−" variant of torch.optim.Rprop).

    s = sign(g · g_prev): step ← clip(step · η₊ / η₋ / 1);  g ← 0 where s < 0;
    θ ← θ − sign(g) · step;  g_prev ← g.  ``state["step_size"]`` starts at η.
    """
    etaminus, etaplus = etas
    step_min, step_max = step_sizes
    g = -grad if maximize else grad.copy()
    prev, step_size = state["prev"], state["step_size"]
    s = np.sign(g * prev)
    factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, 1.0)).astype(param.dtype)
    step_size[...] = np.clip(step_size * factor, step_min, step_max)
    g = np.where(s < 0, 0, g).astype(param.dtype)
    param[...] = param - np.sign(g) * step_size
    prev[...] = g


def yogi(
    param,
    grad,
    state,
    *,
    step,
    lr,
    betas,
    eps,
    initial_accumulator_value,
    weight_decay,
    maximize,
    bias_correction,
):
    r"""Yogi (Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018).

    m and v start at ``initial_accumulator_value``:
    m ← β₁ m + (1 − β₁) g;  v ← v − (1 − β₂) sign(v − g²) g²;  θ ← θ − η m / (√v + ε) (the paper);
    with ``bias_correction`` (optax.yogi) θ ← θ − η/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε).
    ``weight_decay`` adds the L2 term λθ to g (torch-style), off by default.
    """
    beta1, beta2 = betas
    g = _grad(param, grad, maximize, weight_decay)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = (1 - beta1) * g + beta1 * m
    g2 = g * g
    v[...] = v - (1 - beta2) * np.sign(v - g2) * g2
    if bias_correction:
        step_size, bc2_sqrt = lr / (1 - beta1**step), math.sqrt(1 - beta2**step)
        param[...] = param - step_size * (m / (np.sqrt(v) / bc2_sqrt + eps))
    else:
        param[...] = param - lr * (m / (np.sqrt(v) + eps))


def lion(param, grad, state, *, step, lr, betas, weight_decay, maximize):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"; optax.lion).

    c = β₁ m + (1 − β₁) g;  θ ← θ(1 − ηλ) − η sign(c);  m ← β₂ m + (1 − β₂) g
    (decoupled weight decay, as in the paper; λ = 0 by default).
    """
    beta1, beta2 = betas
    g = -grad if maximize else grad
    m = state["exp_avg"]
    c = beta1 * m + (1 - beta1) * g
    param[...] = param * (1 - lr * weight_decay) - lr * np.sign(c)
    m[...] = beta2 * m + (1 - beta2) * g


# ---------------------------------------------------------------------------------------------
# Per-tensor rules (optax's compositions). ``segments``: the (start, stop) of each tensor in the
# flat ``param``; ``decay`` / ``trust``: per tensor, whether weight decay / the trust ratio apply.


def _norm(x):
    return math.sqrt(float(np.dot(x.astype(np.float64), x.astype(np.float64))))


def _trust_ratio(param, update, trust_coefficient=1.0, eps=0.0):
    """optax.scale_by_trust_ratio: tc |p| / (|u| + eps), 1 when either norm is 0."""
    pn, un = _norm(param), _norm(update)
    if pn == 0.0 or un == 0.0:
        return 1.0
    return trust_coefficient * pn / (un + eps)


def lamb(param, grad, state, *, step, segments, decay, trust, lr, betas, eps, weight_decay,
         eps_root, weight_decay_mask, maximize):  # fmt: skip
    """optax.lamb: scale_by_adam, add_decayed_weights, scale_by_trust_ratio, -lr."""
    beta1, beta2 = betas
    g = -grad if maximize else grad
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = (1 - beta1) * g + beta1 * m
    v[...] = (1 - beta2) * (g * g) + beta2 * v
    u = (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step) + eps_root) + eps)
    for (lo, hi), d in zip(segments, decay):
        p = param[lo:hi]
        us = u[lo:hi] + weight_decay * p if d else u[lo:hi]
        p[...] = p - lr * _trust_ratio(p, us) * us


def lars(param, grad, state, *, step, segments, decay, trust, lr, momentum, weight_decay,
         trust_coefficient, eps, nesterov, weight_decay_mask, trust_ratio_mask, maximize):  # fmt: skip
    """optax.lars: add_decayed_weights (masked), scale_by_trust_ratio (masked), -lr, trace."""
    g = -grad if maximize else grad
    buf = state["momentum_buffer"]
    for (lo, hi), d, t in zip(segments, decay, trust):
        p = param[lo:hi]
        u = g[lo:hi] + weight_decay * p if d else g[lo:hi]
        ratio = _trust_ratio(p, u, trust_coefficient, eps) if t else 1.0
        s = lr * ratio * u
        b = buf[lo:hi]
        b[...] = s + momentum * b
        p[...] = p - (s + momentum * b if nesterov else b)


def novograd(param, grad, state, *, step, segments, decay, trust, lr, betas, eps, weight_decay,
             eps_root, weight_decay_mask, maximize):  # fmt: skip
    """optax.novograd: per-tensor nu = |g|^2 (step 1) or b2 nu + (1 - b2)|g|^2; m = b1 m +
    g / (sqrt(nu + eps_root) + eps) + wd p (no b1 m at step 1); p -= lr m."""
    beta1, beta2 = betas
    g = -grad if maximize else grad
    m, nu = state["exp_avg"], state["exp_avg_sq"]
    for s, ((lo, hi), d) in enumerate(zip(segments, decay)):
        n2 = _norm(g[lo:hi]) ** 2
        nu[s] = n2 if step == 1 else (1 - beta2) * n2 + beta2 * nu[s]
        u = g[lo:hi] / (math.sqrt(nu[s] + eps_root) + eps)
        if d:
            u = u + weight_decay * param[lo:hi]
        m[lo:hi] = u if step == 1 else beta1 * m[lo:hi] + u
        param[lo:hi] -= lr * m[lo:hi]


def asgd(param, grad, state, *, step, lr, lambd, alpha, t0, weight_decay, maximize):
    r"""ASGD (torch.optim.ASGD; Polyak & Juditsky 1992), with η = ``state["eta"]`` and
    μ = ``state["mu"]`` from the previous step (lr and 1 at the first):

    θ ← θ(1 − λη) − η g;  ā ← θ if μ = 1 else ā + μ(θ − ā);
    then η ← lr / (1 + λ·lr·t)^α and μ ← 1 / max(1, t − t₀) (advanced in ``state`` here).
    """
    g = _grad(param, grad, maximize, weight_decay)
    eta, mu, ax = state["eta"], state["mu"], state["ax"]
    param[...] = param * (1 - lambd * eta)
    param[...] = param - eta * g
    ax[...] = param if mu == 1 else ax + (param - ax) * mu
    state["eta"] = lr / ((1 + lambd * lr * step) ** alpha)
    state["mu"] = 1 / max(1, step - t0)


def _schedulefree(param, d, state, step, lr, beta, weight_decay, warmup_steps, r, weight_lr_power):
    """The schedulefree package's y/z step for the normalized gradient ``d``; advances
    ``state["lr_max"]`` and ``state["weight_sum"]``."""
    lr = lr * ((step / warmup_steps) if step <= warmup_steps else 1.0)
    lr_max = state["lr_max"] = max(lr, state["lr_max"])
    weight = step**r * lr_max**weight_lr_power
    weight_sum = state["weight_sum"] = state["weight_sum"] + weight
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    z = state["z"]
    if weight_decay != 0:
        d = d + weight_decay * param
    param[...] = _lerp(param, z, ckp1)
    param[...] = param + lr * (beta * (1 - ckp1) - 1) * d
    z[...] = z - lr * d


def sgd_schedulefree(
    param, grad, state, *, step, lr, momentum, weight_decay, warmup_steps, r, weight_lr_power
):
    r"""Schedule-free SGD (Defazio et al. 2024; schedulefree.SGDScheduleFree). ``param`` is y;
    with γ the warmed-up lr, c = w_t / Σ w (w_t = t^r · max γ^p) and β = ``momentum``:
    d = g + λy;  y ← lerp(y, z, c) + γ(β(1 − c) − 1) d;  z ← z − γ d.
    """
    _schedulefree(
        param, grad, state, step, lr, momentum, weight_decay, warmup_steps, r, weight_lr_power
    )


def adamw_schedulefree(
    param, grad, state, *, step, lr, betas, eps, weight_decay, warmup_steps, r, weight_lr_power
):
    r"""Schedule-free AdamW (Defazio et al. 2024; schedulefree.AdamWScheduleFree): the
    schedule-free SGD step of :func:`sgd_schedulefree` with β = β₁ on the normalized gradient
    g / (√(v / (1 − β₂ᵗ)) + ε), v ← β₂ v + (1 − β₂) g².
    """
    beta1, beta2 = betas
    v = state["exp_avg_sq"]
    v[...] = v * beta2 + ((1 - beta2) * grad) * grad
    d = grad / (np.sqrt(v / (1 - beta2**step)) + eps)
    _schedulefree(param, d, state, step, lr, beta1, weight_decay, warmup_steps, r, weight_lr_power)


def schedulefree_swap(param, z, weight):
    """``train()`` / ``eval()`` of the schedule-free optimizers: θ ← lerp(θ, z, weight), with
    weight 1 − 1/β (y to x) or 1 − β (x to y)."""
    param[...] = _lerp(param, z, weight)


def adafactor(param, grad, state, *, step, lr, beta2_decay, eps, d, weight_decay, maximize,
              foreach=None, shapes=None):  # fmt: skip
    r"""torch.optim.Adafactor (Shazeer & Stern 2018, torch's variant) over the tensors of
    ``shapes`` (default: ``param.shape``) laid out back to back in ``param``. Per tensor, with
    w = t^τ (τ = ``beta2_decay``), ρ = min(lr, 1/√t), α = max(ε₂, RMS(θ)) ρ:

    θ ← θ(1 − lr λ);  for ≥ 2 dims, per matrix of the last two: R ← lerp(R, mean_row(G²), w),
    C ← lerp(C, mean_col(G²), w), V = R Cᵀ / max(mean(R), ε₁); else V ← lerp(V, G², w);
    U = G / max(√V, ε₁) (as rsqrt(max(V, ε₁²)) G);  θ ← θ − α U / max(1, RMS(U) / d).

    ε₁ = None is the dtype's machine epsilon. ``state["row_var"]``, ``state["col_var"]`` and
    ``state["variance"]`` hold the tensors' factors (and vectors' variances) back to back, in
    tensor order, each matrix's rows (columns) in order.
    """
    shapes = [tuple(param.shape)] if shapes is None else [tuple(s) for s in shapes]
    eps1, eps2 = eps
    if eps1 is None:
        eps1 = float(np.finfo(param.dtype).eps)
    w = float(step) ** beta2_decay
    rho = min(lr, 1 / (float(step) ** 0.5))
    flat_p, flat_g = param.reshape(-1), grad.reshape(-1)
    pos = {"p": 0, "row_var": 0, "col_var": 0, "variance": 0}

    def take(name, count):
        a = state[name].reshape(-1)[pos[name] : pos[name] + count]
        pos[name] += count
        return a

    for shape in shapes:
        size = math.prod(shape)
        p = flat_p[pos["p"] : pos["p"] + size].reshape(shape)
        g = flat_g[pos["p"] : pos["p"] + size].reshape(shape)
        pos["p"] += size
        g = -g if maximize else g
        alpha = max(eps2, _norm(p.ravel()) / size**0.5) * rho if size else 0.0
        if weight_decay != 0:
            p[...] = p * (1 - lr * weight_decay)
        if len(shape) >= 2:
            m, n = shape[-2], shape[-1]
            batch = shape[:-2]
            r = take("row_var", math.prod(batch) * m).reshape(*batch, m, 1)
            c = take("col_var", math.prod(batch) * n).reshape(*batch, 1, n)
            r[...] = _lerp(r, (g * g).mean(axis=-1, keepdims=True), w)
            c[...] = _lerp(c, (g * g).mean(axis=-2, keepdims=True), w)
            v = (r * c) / np.maximum(r.mean(axis=-2, keepdims=True), eps1)
        else:
            v = take("variance", size).reshape(shape)
            v[...] = _lerp(v, g * g, w)
            v = v.copy()
        u = (1 / np.sqrt(np.maximum(v, eps1 * eps1))) * g
        if size:
            denom = max(1.0, _norm(u.ravel()) / (size**0.5 * d))
            p[...] = p + (-alpha / denom) * u


def _to_bfloat16(x):
    """``x`` rounded to bfloat16 values (nearest even), kept as float32: torch's bf16 tensors."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def newton_schulz(g, *, ns_coefficients, ns_steps, eps, ns_dtype="float64"):
    r"""torch.optim.Muon's ``_zeropower_via_newtonschulz`` on the matrix ``g``, literally: X = G
    (Gᵀ when G is tall), X ← X / max(‖X‖_F, ε), then ``ns_steps`` times
    A = X Xᵀ, B = bA + cA², X ← aX + BX with (a, b, c) = ``ns_coefficients``; transposed back.
    ``ns_dtype`` ("float64", "float32", or "bfloat16": float32 products whose every stored
    result, as torch's bf16 tensors, is rounded to bfloat16) is the dtype it runs in."""
    a, b, c = ns_coefficients
    bf16 = ns_dtype == "bfloat16"
    r = _to_bfloat16 if bf16 else (lambda m: m)
    x = r(np.array(g, dtype=np.float32 if bf16 else np.dtype(ns_dtype)))
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = r(x / r(np.maximum(np.linalg.norm(x), eps)))
    for _ in range(ns_steps):
        gram = r(x @ x.T)
        update = r(b * gram + c * (gram @ gram))
        x = r(a * x + update @ x)
    return x.T if tall else x


def muon(param, grad, state, *, step, lr, weight_decay, momentum, nesterov, ns_coefficients,
         eps, ns_steps, adjust_lr_fn, ns_dtype="float64"):  # fmt: skip
    r"""torch.optim.Muon (K. Jordan et al. 2024) on one 2-D parameter (A x B):

    B ← lerp(B, g, 1 − μ);  U = lerp(g, B, μ) if nesterov else B;  O = NS(U) (:func:`newton_schulz`);
    θ ← θ(1 − ηλ) − η s O, with s = √max(1, A/B) (``adjust_lr_fn`` None or "original") or
    0.2 √max(A, B) ("match_rms_adamw"). ``state["momentum_buffer"]`` is B (zeros at first)."""
    rows, cols = param.shape
    buf = state["momentum_buffer"]
    buf[...] = _lerp(buf, grad, 1 - momentum)
    update = _lerp(grad, buf, momentum) if nesterov else buf
    o = newton_schulz(
        update, ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, ns_dtype=ns_dtype
    )
    if adjust_lr_fn == "match_rms_adamw":
        scale = 0.2 * math.sqrt(max(rows, cols))
    else:
        scale = math.sqrt(max(1, rows / cols))
    param[...] = param * (1 - lr * weight_decay)
    param[...] = param - (lr * scale) * o.astype(param.dtype)
