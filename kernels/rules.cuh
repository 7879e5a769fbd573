// fastopt update rules in CUDA C: the same arithmetic as kernels/rules.py, operation by operation.
//
// Every public rule of rules.py (rules.RULES) is a `__host__ __device__` function template here,
// with the same name, the same state slots (by reference, updated in place) and the same per-step
// scalar tuple `h` (a pointer to the scalars, in the order rules.py documents next to each rule).
// Python expressions are transcribed with the same parenthesisation, so every intermediate result
// is rounded exactly where the Python/Numba version rounds it.
//
// T is the arithmetic type: `float` / `double` (host code, e.g. the test harness), or
// `fo::ieee<float>` / `fo::ieee<double>` (what the kernels use on the device). The ieee<> wrapper
// spells each operation as one explicitly rounded PTX instruction (add.rn, mul.rn, div.rn,
// sqrt.rn, setp without .ftz) so the device arithmetic is plain IEEE 754, whatever the compile
// options: no FMA contraction (nvcc/NVRTC contract a*b+c by default) and no flush-to-zero of
// subnormals (CuPy appends -ftz=true to every RawModule compile, after the caller's options).
// That keeps the CuPy kernels bit-identical to the Numba CPU kernels.
//
// Adding a rule: write it below and add one line to FO_RULES (name, number of state slots,
// length of h). The kernels (optim_kernels.cu), the CuPy launcher and the test harness are all
// generated from FO_RULES; none of them needs changes. tests/test_cuda_c.py checks FO_RULES
// against rules.RULES and every rule, bit for bit, against rules.py: keep the two in step.
//
// No #include: the file must compile under NVRTC (no standard headers) as well as nvcc.

#ifndef FASTOPT_RULES_CUH
#define FASTOPT_RULES_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FO_HD __host__ __device__ __forceinline__
#else
#define FO_HD inline
#endif

// Largest length of any rule's scalar tuple h (the kernels take a fixed-size struct).
#define FO_MAX_SCALARS 16

// X-macro list of the public rules, in rules.RULES order: X(name, state slots, len(h)).
#define FO_RULES(X)                     \
    X(sgd, 0, 3)                        \
    X(sgd_momentum, 1, 7)               \
    X(adagrad, 1, 4)                    \
    X(rmsprop, 1, 7)                    \
    X(rmsprop_momentum, 2, 7)           \
    X(rmsprop_centered, 2, 7)           \
    X(rmsprop_centered_momentum, 3, 7)  \
    X(adadelta, 2, 6)                   \
    X(adam, 2, 10)                      \
    X(adam_amsgrad, 3, 10)              \
    X(adamax, 2, 7)                     \
    X(nadam, 2, 11)                     \
    X(radam, 2, 13)                     \
    X(rprop, 2, 6)                      \
    X(yogi, 2, 7)                       \
    X(lion, 1, 7)                       \
    X(ema, 0, 2)

namespace fo {

// -------------------------------------------------------------------------------------------
// Scalars of one step, passed to a kernel by value (h[k] for k < len(h); the rest is padding).

template <typename T>
struct Scalars {
    T v[FO_MAX_SCALARS];
};

// -------------------------------------------------------------------------------------------
// Math on plain float / double: overloads that keep float in float.

FO_HD float fo_sqrt(float x) { return sqrtf(x); }
FO_HD double fo_sqrt(double x) { return sqrt(x); }
FO_HD float fo_abs(float x) { return fabsf(x); }
FO_HD double fo_abs(double x) { return fabs(x); }

// -------------------------------------------------------------------------------------------
// ieee<F>: an F whose operations are single, correctly rounded IEEE 754 operations on the device
// (inline PTX with an explicit rounding mode is never fused into an FMA and has no .ftz), and
// plain C++ operators on the host. Only what rules need: + - * /, unary -, < > <= !=, sqrt, abs.

template <typename F>
struct ieee {
    F v;
    FO_HD ieee() {}
    FO_HD explicit ieee(F x) : v(x) {}
};

#if defined(__CUDA_ARCH__)
#define FO_IEEE_BINOP(F, OP, PTX, C)                                      \
    FO_HD ieee<F> operator OP(ieee<F> a, ieee<F> b) {                     \
        F r;                                                              \
        asm(PTX " %0, %1, %2;" : "=" C(r) : C(a.v), C(b.v));              \
        return ieee<F>(r);                                                \
    }
#define FO_IEEE_CMP(F, OP, PTX, C)                                        \
    FO_HD bool operator OP(ieee<F> a, ieee<F> b) {                        \
        unsigned r;                                                       \
        asm("{\n\t.reg .pred fo_p;\n\t" PTX " fo_p, %1, %2;\n\t"          \
            "selp.u32 %0, 1, 0, fo_p;\n\t}"                               \
            : "=r"(r) : C(a.v), C(b.v));                                  \
        return r != 0u;                                                   \
    }
#define FO_IEEE_UNARY(F, NAME, PTX, C)                                    \
    FO_HD ieee<F> NAME(ieee<F> a) {                                       \
        F r;                                                              \
        asm(PTX " %0, %1;" : "=" C(r) : C(a.v));                          \
        return ieee<F>(r);                                                \
    }
#define FO_IEEE_NEG(F, PTX, C) FO_IEEE_UNARY(F, operator-, PTX, C)
#else
#define FO_IEEE_BINOP(F, OP, PTX, C) \
    FO_HD ieee<F> operator OP(ieee<F> a, ieee<F> b) { return ieee<F>(a.v OP b.v); }
#define FO_IEEE_CMP(F, OP, PTX, C) \
    FO_HD bool operator OP(ieee<F> a, ieee<F> b) { return a.v OP b.v; }
#define FO_IEEE_UNARY(F, NAME, PTX, C) \
    FO_HD ieee<F> NAME(ieee<F> a) { return ieee<F>(NAME(a.v)); }
#define FO_IEEE_NEG(F, PTX, C) \
    FO_HD ieee<F> operator-(ieee<F> a) { return ieee<F>(-a.v); }
#endif

// PTX comparisons without the .u suffix are ordered: false when either operand is NaN, like
// Python's `<`, `>`, `<=` on floats; `!=` is unordered (setp.neu: true with a NaN), like Python's.
#define FO_IEEE_TYPE(F, S, C)                        \
    FO_IEEE_BINOP(F, +, "add.rn." S, C)              \
    FO_IEEE_BINOP(F, -, "sub.rn." S, C)              \
    FO_IEEE_BINOP(F, *, "mul.rn." S, C)              \
    FO_IEEE_BINOP(F, /, "div.rn." S, C)              \
    FO_IEEE_CMP(F, <, "setp.lt." S, C)               \
    FO_IEEE_CMP(F, >, "setp.gt." S, C)               \
    FO_IEEE_CMP(F, <=, "setp.le." S, C)              \
    FO_IEEE_CMP(F, !=, "setp.neu." S, C)             \
    FO_IEEE_UNARY(F, fo_sqrt, "sqrt.rn." S, C)       \
    FO_IEEE_UNARY(F, fo_abs, "abs." S, C)            \
    FO_IEEE_NEG(F, "neg." S, C)

FO_IEEE_TYPE(float, "f32", "f")
FO_IEEE_TYPE(double, "f64", "d")

#undef FO_IEEE_TYPE
#undef FO_IEEE_BINOP
#undef FO_IEEE_CMP
#undef FO_IEEE_UNARY
#undef FO_IEEE_NEG

// -------------------------------------------------------------------------------------------
// Shared pieces (rules.py: lerp, clamp, transformed_grad, l2_grad, second_moment) and Python's
// max of two floats.

// max(a, b) propagating NaN from either side, as torch.maximum (rules.py: maximum).
template <typename T>
FO_HD T maximum(T a, T b) {
    if (a > b) {
        return a;
    }
    if (a <= b) {
        return b;
    }
    return a + b;
}

// torch.lerp: a + w (b - a) for w < 0.5, else b - (b - a)(1 - w).
template <typename T>
FO_HD T lerp(T a, T b, T w, T one_minus_w) {
    if (w < T(0.5)) {
        return a + w * (b - a);
    }
    return b - (b - a) * one_minus_w;
}

// x limited to [lo, hi]; NaN stays NaN (as torch.clamp).
template <typename T>
FO_HD T clamp(T x, T lo, T hi) {
    if (x < lo) {
        return lo;
    }
    if (x > hi) {
        return hi;
    }
    return x;
}

// The gradient a rule sees: g * gscale, then clipped to [-clip, clip] when clip > 0. Applied by
// every loop (optim_kernels.cu) before the rule; gscale = 1 and clip = 0 leave g unchanged.
template <typename T>
FO_HD T transformed_grad(T g, T gscale, T clip) {
    g = g * gscale;
    if (clip > T(0)) {
        g = clamp(g, -clip, clip);
    }
    return g;
}

// Gradient after maximize (gsign = -1) and coupled L2 weight decay g + wd * p, skipped when
// wd = 0 as torch does (0 * p would turn an infinite p into NaN).
template <typename T>
FO_HD T l2_grad(T p, T g, T gsign, T weight_decay) {
    g = gsign * g;
    if (weight_decay != T(0)) {
        g = g + weight_decay * p;
    }
    return g;
}

// v * beta + (1 - beta) * g^2.
template <typename T>
FO_HD T second_moment(T v, T g, T beta, T one_minus_beta) {
    return v * beta + one_minus_beta * (g * g);
}

// -------------------------------------------------------------------------------------------
// SGD.  h = (lr, weight_decay, gsign)    momentum: + (momentum, 1 - dampening, nesterov, first)

template <typename T>
FO_HD void sgd(T& p, T g, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2];
    g = l2_grad(p, g, gsign, weight_decay);
    p = p - lr * g;
}

template <typename T>
FO_HD void sgd_momentum(T& p, T g, T& buf, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2], momentum = h[3];
    const T one_minus_dampening = h[4], nesterov = h[5], first = h[6];
    g = l2_grad(p, g, gsign, weight_decay);
    if (first > T(0)) {
        buf = g;
    } else {
        buf = buf * momentum + one_minus_dampening * g;
    }
    T d;
    if (nesterov > T(0)) {
        d = g + momentum * buf;
    } else {
        d = buf;
    }
    p = p - lr * d;
}

// -------------------------------------------------------------------------------------------
// Adagrad.  h = (clr, weight_decay, gsign, eps) with clr = lr / (1 + (t - 1) lr_decay)

template <typename T>
FO_HD void adagrad(T& p, T g, T& acc, const T* h) {
    const T clr = h[0], weight_decay = h[1], gsign = h[2], eps = h[3];
    g = l2_grad(p, g, gsign, weight_decay);
    acc = acc + g * g;
    p = p - clr * (g / (fo_sqrt(acc) + eps));
}

// -------------------------------------------------------------------------------------------
// RMSprop.  h = (lr, weight_decay, gsign, alpha, 1 - alpha, eps, momentum)
// State order follows torch: square_avg, momentum_buffer (if momentum), grad_avg (if centered).

template <typename T>
FO_HD void rmsprop(T& p, T g, T& sq, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2], alpha = h[3];
    const T one_minus_alpha = h[4], eps = h[5];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    p = p - lr * (g / (fo_sqrt(sq) + eps));
}

template <typename T>
FO_HD void rmsprop_momentum(T& p, T g, T& sq, T& buf, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2], alpha = h[3];
    const T one_minus_alpha = h[4], eps = h[5], momentum = h[6];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    buf = buf * momentum + g / (fo_sqrt(sq) + eps);
    p = p - lr * buf;
}

template <typename T>
FO_HD void rmsprop_centered(T& p, T g, T& sq, T& gavg, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2], alpha = h[3];
    const T one_minus_alpha = h[4], eps = h[5];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    gavg = lerp(gavg, g, one_minus_alpha, alpha);
    p = p - lr * (g / (fo_sqrt(sq - gavg * gavg) + eps));
}

template <typename T>
FO_HD void rmsprop_centered_momentum(T& p, T g, T& sq, T& buf, T& gavg, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2], alpha = h[3];
    const T one_minus_alpha = h[4], eps = h[5], momentum = h[6];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    gavg = lerp(gavg, g, one_minus_alpha, alpha);
    buf = buf * momentum + g / (fo_sqrt(sq - gavg * gavg) + eps);
    p = p - lr * buf;
}

// -------------------------------------------------------------------------------------------
// Adadelta.  h = (lr, weight_decay, gsign, rho, 1 - rho, eps)

template <typename T>
FO_HD void adadelta(T& p, T g, T& sq, T& acc_delta, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2], rho = h[3];
    const T one_minus_rho = h[4], eps = h[5];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, rho, one_minus_rho);
    const T delta = fo_sqrt(acc_delta + eps) / fo_sqrt(sq + eps) * g;
    acc_delta = second_moment(acc_delta, delta, rho, one_minus_rho);
    p = p - lr * delta;
}

// -------------------------------------------------------------------------------------------
// Adam / AdamW.  h = (decay, weight_decay, gsign, beta1, 1 - beta1, beta2, 1 - beta2,
//                     step_size, sqrt(bias_correction2), eps)
// decay = 1 - lr * wd for decoupled (AdamW) weight decay, else 1 with weight_decay the L2 term.

// Decay, L2 term and both moments; g becomes the effective gradient.
template <typename T>
FO_HD void adam_moments(T& p, T& g, T& m, T& v, const T* h) {
    const T decay = h[0], weight_decay = h[1], gsign = h[2], beta1 = h[3];
    const T one_minus_beta1 = h[4], beta2 = h[5], one_minus_beta2 = h[6];
    p = p * decay;
    g = l2_grad(p, g, gsign, weight_decay);
    m = lerp(m, g, one_minus_beta1, beta1);
    v = second_moment(v, g, beta2, one_minus_beta2);
}

template <typename T>
FO_HD void adam_apply(T& p, T m, T v, const T* h) {
    const T step_size = h[7], bias_correction2_sqrt = h[8], eps = h[9];
    p = p - step_size * (m / (fo_sqrt(v) / bias_correction2_sqrt + eps));
}

template <typename T>
FO_HD void adam(T& p, T g, T& m, T& v, const T* h) {
    adam_moments(p, g, m, v, h);
    adam_apply(p, m, v, h);
}

template <typename T>
FO_HD void adam_amsgrad(T& p, T g, T& m, T& v, T& vmax, const T* h) {
    adam_moments(p, g, m, v, h);
    vmax = maximum(vmax, v);
    adam_apply(p, m, vmax, h);
}

// -------------------------------------------------------------------------------------------
// Adamax.  h = (weight_decay, gsign, beta1, 1 - beta1, beta2, eps, clr), clr = lr / (1 - beta1^t)

template <typename T>
FO_HD void adamax(T& p, T g, T& m, T& u, const T* h) {
    const T weight_decay = h[0], gsign = h[1], beta1 = h[2], one_minus_beta1 = h[3];
    const T beta2 = h[4], eps = h[5], clr = h[6];
    g = l2_grad(p, g, gsign, weight_decay);
    m = lerp(m, g, one_minus_beta1, beta1);
    u = maximum(u * beta2, fo_abs(g) + eps);
    p = p - clr * (m / u);
}

// -------------------------------------------------------------------------------------------
// NAdam.  h = (decay, weight_decay, gsign, beta1, 1 - beta1, beta2, 1 - beta2,
//              bias_correction2, eps, c_grad, c_avg)

template <typename T>
FO_HD void nadam(T& p, T g, T& m, T& v, const T* h) {
    adam_moments(p, g, m, v, h);
    const T bias_correction2 = h[7], eps = h[8], c_grad = h[9], c_avg = h[10];
    const T denom = fo_sqrt(v / bias_correction2) + eps;
    p = p - c_grad * (g / denom);
    p = p - c_avg * (m / denom);
}

// -------------------------------------------------------------------------------------------
// RAdam.  h = (decay, weight_decay, gsign, beta1, 1 - beta1, beta2, 1 - beta2,
//              bias_correction1, lr, rectify, rect, sqrt(bias_correction2), eps)

template <typename T>
FO_HD void radam(T& p, T g, T& m, T& v, const T* h) {
    adam_moments(p, g, m, v, h);
    const T bias_correction1 = h[7], lr = h[8], rectify = h[9], rect = h[10];
    const T bias_correction2_sqrt = h[11], eps = h[12];
    const T m_hat = m / bias_correction1;
    if (rectify > T(0)) {
        p = p - m_hat * lr * (bias_correction2_sqrt / (fo_sqrt(v) + eps)) * rect;
    } else {
        p = p - m_hat * lr;
    }
}

// -------------------------------------------------------------------------------------------
// Rprop.  h = (gsign, etaminus, etaplus, step_size_min, step_size_max, zero)
// State slots: prev (the previous, possibly zeroed, gradient), step_size.

template <typename T>
FO_HD void rprop(T& p, T g, T& prev, T& step_size, const T* h) {
    const T gsign = h[0], etaminus = h[1], etaplus = h[2];
    const T step_size_min = h[3], step_size_max = h[4], zero = h[5];
    g = gsign * g;
    const T same_direction = g * prev;
    if (same_direction > T(0)) {
        step_size = clamp(step_size * etaplus, step_size_min, step_size_max);
    } else if (same_direction < T(0)) {
        step_size = clamp(step_size * etaminus, step_size_min, step_size_max);
        g = zero;
    } else {
        step_size = clamp(step_size, step_size_min, step_size_max);
    }
    if (g > T(0)) {
        p = p - step_size;
    } else if (g < T(0)) {
        p = p + step_size;
    }
    prev = g;
}

// -------------------------------------------------------------------------------------------
// Yogi (Zaheer et al., NeurIPS 2018; optax.scale_by_yogi: no bias correction).
// h = (lr, weight_decay, gsign, beta1, 1 - beta1, 1 - beta2, eps)

template <typename T>
FO_HD void yogi(T& p, T g, T& m, T& v, const T* h) {
    const T lr = h[0], weight_decay = h[1], gsign = h[2], beta1 = h[3];
    const T one_minus_beta1 = h[4], one_minus_beta2 = h[5], eps = h[6];
    g = l2_grad(p, g, gsign, weight_decay);
    m = one_minus_beta1 * g + beta1 * m;
    const T g2 = g * g;
    if (v > g2) {
        v = v - one_minus_beta2 * g2;
    } else if (v < g2) {
        v = v + one_minus_beta2 * g2;
    }
    p = p - lr * (m / (fo_sqrt(v) + eps));
}

// -------------------------------------------------------------------------------------------
// Lion (Chen et al., 2023; optax.lion).
// h = (decay, lr, gsign, beta1, 1 - beta1, beta2, 1 - beta2) with decay = 1 - lr * wd

template <typename T>
FO_HD void lion(T& p, T g, T& m, const T* h) {
    const T decay = h[0], lr = h[1], gsign = h[2], beta1 = h[3];
    const T one_minus_beta1 = h[4], beta2 = h[5], one_minus_beta2 = h[6];
    g = gsign * g;
    const T c = beta1 * m + one_minus_beta1 * g;
    p = p * decay;
    if (c > T(0)) {
        p = p - lr;
    } else if (c < T(0)) {
        p = p + lr;
    }
    m = beta2 * m + one_minus_beta2 * g;
}

// -------------------------------------------------------------------------------------------
// EMA of parameters (torch.optim.swa_utils get_ema_multi_avg_fn: avg.lerp_(param, 1 - decay)).
// The average takes the parameter slot, the parameter the gradient slot.  h = (1 - decay, decay)

template <typename T>
FO_HD void ema(T& avg, T p, const T* h) {
    const T one_minus_decay = h[0], decay = h[1];
    avg = lerp(avg, p, one_minus_decay, decay);
}

// -------------------------------------------------------------------------------------------
// One functor per rule, generated from FO_RULES, with a uniform call: apply(p, g, s, h) where
// s is an array of the rule's state slots. Used by the kernels and the host test harness.

#define FO_CALL_0(name) name(p, g, h)
#define FO_CALL_1(name) name(p, g, s[0], h)
#define FO_CALL_2(name) name(p, g, s[0], s[1], h)
#define FO_CALL_3(name) name(p, g, s[0], s[1], s[2], h)

#define FO_DEFINE_OP(name, nstates, nscalars)                                         \
    struct op_##name {                                                                \
        static const int num_states = nstates;                                        \
        static const int num_scalars = nscalars;                                      \
        template <typename T>                                                         \
        static FO_HD void apply(T& p, T g, T* s, const T* h) { FO_CALL_##nstates(name); } \
    };

FO_RULES(FO_DEFINE_OP)

#undef FO_DEFINE_OP

}  // namespace fo

#endif  // FASTOPT_RULES_CUH
