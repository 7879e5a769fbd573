// fastopt update rules in CUDA C: the same arithmetic as kernels/rules.py, operation by operation.
//
// Every public rule of rules.py (rules.RULES) is a `__host__ __device__` function template here,
// with the same name, the same state slots (by reference, updated in place) and the same per-step
// scalars `h` (a pointer to the scalars), read by field: h[FO_<LAYOUT>_<FIELD>]. The indices, the
// FO_RULES list and the shared constants come from rules_layout.cuh, generated from the
// declarations next to the rules in rules.py (python -m fastopt.kernels.layout).
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
// Adding a rule: write it (and its scalar declaration) in rules.py, regenerate rules_layout.cuh,
// then write it below. The kernels (optim_kernels.cu), the CuPy launcher and the test harness are
// all generated from FO_RULES; none of them needs changes. tests/test_cuda_c.py checks every rule,
// bit for bit, against rules.py: keep the two in step.
//
// No standard #include: the file must compile under NVRTC (no standard headers) as well as nvcc.
// kernels/cupy.py inlines rules_layout.cuh for NVRTC (and refuses a stale one).

#ifndef FASTOPT_RULES_CUH
#define FASTOPT_RULES_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FO_HD __host__ __device__ __forceinline__
#else
#define FO_HD inline
#endif

// FO_MAX_SCALARS (the kernels take a fixed-size struct), FO_RULES (X(name, state slots, len(h)),
// in rules.RULES order) and the FO_<LAYOUT>_<FIELD> indices into h.
#include "rules_layout.cuh"

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

// v * beta + ((1 - beta) * g) * g: g scaled before it is squared, as torch's addcmul (rules.py).
template <typename T>
FO_HD T second_moment(T v, T g, T beta, T one_minus_beta) {
    return v * beta + (one_minus_beta * g) * g;
}

// -------------------------------------------------------------------------------------------
// SGD (rules.py: sgd, sgd_momentum).

template <typename T>
FO_HD void sgd(T& p, T g, const T* h) {
    const T lr = h[FO_SGD_LR];
    const T weight_decay = h[FO_SGD_WEIGHT_DECAY];
    const T gsign = h[FO_SGD_GSIGN];
    g = l2_grad(p, g, gsign, weight_decay);
    p = p - lr * g;
}

template <typename T>
FO_HD void sgd_momentum(T& p, T g, T& buf, const T* h) {
    const T lr = h[FO_SGD_MOMENTUM_LR];
    const T weight_decay = h[FO_SGD_MOMENTUM_WEIGHT_DECAY];
    const T gsign = h[FO_SGD_MOMENTUM_GSIGN];
    const T momentum = h[FO_SGD_MOMENTUM_MOMENTUM];
    const T one_minus_dampening = h[FO_SGD_MOMENTUM_ONE_MINUS_DAMPENING];
    const T nesterov = h[FO_SGD_MOMENTUM_NESTEROV];
    const T first = h[FO_SGD_MOMENTUM_FIRST];
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
// Adagrad.

template <typename T>
FO_HD void adagrad(T& p, T g, T& acc, const T* h) {
    const T clr = h[FO_ADAGRAD_CLR];
    const T weight_decay = h[FO_ADAGRAD_WEIGHT_DECAY];
    const T gsign = h[FO_ADAGRAD_GSIGN];
    const T eps = h[FO_ADAGRAD_EPS];
    g = l2_grad(p, g, gsign, weight_decay);
    acc = acc + g * g;
    p = p - clr * (g / (fo_sqrt(acc) + eps));
}

// -------------------------------------------------------------------------------------------
// RMSprop (the four variants share the rmsprop layout).
// State order follows torch: square_avg, momentum_buffer (if momentum), grad_avg (if centered).

template <typename T>
FO_HD void rmsprop(T& p, T g, T& sq, const T* h) {
    const T lr = h[FO_RMSPROP_LR];
    const T weight_decay = h[FO_RMSPROP_WEIGHT_DECAY];
    const T gsign = h[FO_RMSPROP_GSIGN];
    const T alpha = h[FO_RMSPROP_ALPHA];
    const T one_minus_alpha = h[FO_RMSPROP_ONE_MINUS_ALPHA];
    const T eps = h[FO_RMSPROP_EPS];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    p = p - lr * (g / (fo_sqrt(sq) + eps));
}

template <typename T>
FO_HD void rmsprop_momentum(T& p, T g, T& sq, T& buf, const T* h) {
    const T lr = h[FO_RMSPROP_LR];
    const T weight_decay = h[FO_RMSPROP_WEIGHT_DECAY];
    const T gsign = h[FO_RMSPROP_GSIGN];
    const T alpha = h[FO_RMSPROP_ALPHA];
    const T one_minus_alpha = h[FO_RMSPROP_ONE_MINUS_ALPHA];
    const T eps = h[FO_RMSPROP_EPS];
    const T momentum = h[FO_RMSPROP_MOMENTUM];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    buf = buf * momentum + g / (fo_sqrt(sq) + eps);
    p = p - lr * buf;
}

template <typename T>
FO_HD void rmsprop_centered(T& p, T g, T& sq, T& gavg, const T* h) {
    const T lr = h[FO_RMSPROP_LR];
    const T weight_decay = h[FO_RMSPROP_WEIGHT_DECAY];
    const T gsign = h[FO_RMSPROP_GSIGN];
    const T alpha = h[FO_RMSPROP_ALPHA];
    const T one_minus_alpha = h[FO_RMSPROP_ONE_MINUS_ALPHA];
    const T eps = h[FO_RMSPROP_EPS];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    gavg = lerp(gavg, g, one_minus_alpha, alpha);
    p = p - lr * (g / (fo_sqrt(sq - gavg * gavg) + eps));
}

template <typename T>
FO_HD void rmsprop_centered_momentum(T& p, T g, T& sq, T& buf, T& gavg, const T* h) {
    const T lr = h[FO_RMSPROP_LR];
    const T weight_decay = h[FO_RMSPROP_WEIGHT_DECAY];
    const T gsign = h[FO_RMSPROP_GSIGN];
    const T alpha = h[FO_RMSPROP_ALPHA];
    const T one_minus_alpha = h[FO_RMSPROP_ONE_MINUS_ALPHA];
    const T eps = h[FO_RMSPROP_EPS];
    const T momentum = h[FO_RMSPROP_MOMENTUM];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, alpha, one_minus_alpha);
    gavg = lerp(gavg, g, one_minus_alpha, alpha);
    buf = buf * momentum + g / (fo_sqrt(sq - gavg * gavg) + eps);
    p = p - lr * buf;
}

// -------------------------------------------------------------------------------------------
// Adadelta.

template <typename T>
FO_HD void adadelta(T& p, T g, T& sq, T& acc_delta, const T* h) {
    const T lr = h[FO_ADADELTA_LR];
    const T weight_decay = h[FO_ADADELTA_WEIGHT_DECAY];
    const T gsign = h[FO_ADADELTA_GSIGN];
    const T rho = h[FO_ADADELTA_RHO];
    const T one_minus_rho = h[FO_ADADELTA_ONE_MINUS_RHO];
    const T eps = h[FO_ADADELTA_EPS];
    g = l2_grad(p, g, gsign, weight_decay);
    sq = second_moment(sq, g, rho, one_minus_rho);
    const T delta = fo_sqrt(acc_delta + eps) / fo_sqrt(sq + eps) * g;
    acc_delta = second_moment(acc_delta, delta, rho, one_minus_rho);
    p = p - lr * delta;
}

// -------------------------------------------------------------------------------------------
// Adam / AdamW (the adam layout; adam_moments reads the prefix shared by NAdam and RAdam).
// decay = 1 - lr * wd for decoupled (AdamW) weight decay, else 1 with weight_decay the L2 term.

// Decay, L2 term and both moments; g becomes the effective gradient.
template <typename T>
FO_HD void adam_moments(T& p, T& g, T& m, T& v, const T* h) {
    const T decay = h[FO_ADAM_MOMENTS_DECAY];
    const T weight_decay = h[FO_ADAM_MOMENTS_WEIGHT_DECAY];
    const T gsign = h[FO_ADAM_MOMENTS_GSIGN];
    const T beta1 = h[FO_ADAM_MOMENTS_BETA1];
    const T one_minus_beta1 = h[FO_ADAM_MOMENTS_ONE_MINUS_BETA1];
    const T beta2 = h[FO_ADAM_MOMENTS_BETA2];
    const T one_minus_beta2 = h[FO_ADAM_MOMENTS_ONE_MINUS_BETA2];
    p = p * decay;
    g = l2_grad(p, g, gsign, weight_decay);
    m = lerp(m, g, one_minus_beta1, beta1);
    v = second_moment(v, g, beta2, one_minus_beta2);
}

template <typename T>
FO_HD void adam_apply(T& p, T m, T v, const T* h) {
    const T step_size = h[FO_ADAM_STEP_SIZE];
    const T bias_correction2_sqrt = h[FO_ADAM_BIAS_CORRECTION2_SQRT];
    const T eps = h[FO_ADAM_EPS];
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
// Adamax.

template <typename T>
FO_HD void adamax(T& p, T g, T& m, T& u, const T* h) {
    const T weight_decay = h[FO_ADAMAX_WEIGHT_DECAY];
    const T gsign = h[FO_ADAMAX_GSIGN];
    const T beta1 = h[FO_ADAMAX_BETA1];
    const T one_minus_beta1 = h[FO_ADAMAX_ONE_MINUS_BETA1];
    const T beta2 = h[FO_ADAMAX_BETA2];
    const T eps = h[FO_ADAMAX_EPS];
    const T clr = h[FO_ADAMAX_CLR];
    g = l2_grad(p, g, gsign, weight_decay);
    m = lerp(m, g, one_minus_beta1, beta1);
    u = maximum(u * beta2, fo_abs(g) + eps);
    p = p - clr * (m / u);
}

// -------------------------------------------------------------------------------------------
// NAdam.

template <typename T>
FO_HD void nadam(T& p, T g, T& m, T& v, const T* h) {
    adam_moments(p, g, m, v, h);
    const T bias_correction2 = h[FO_NADAM_BIAS_CORRECTION2];
    const T eps = h[FO_NADAM_EPS];
    const T c_grad = h[FO_NADAM_C_GRAD];
    const T c_avg = h[FO_NADAM_C_AVG];
    const T denom = fo_sqrt(v / bias_correction2) + eps;
    p = p - c_grad * (g / denom);
    p = p - c_avg * (m / denom);
}

// -------------------------------------------------------------------------------------------
// RAdam.

template <typename T>
FO_HD void radam(T& p, T g, T& m, T& v, const T* h) {
    adam_moments(p, g, m, v, h);
    const T bias_correction1 = h[FO_RADAM_BIAS_CORRECTION1];
    const T lr = h[FO_RADAM_LR];
    const T rectify = h[FO_RADAM_RECTIFY];
    const T rect = h[FO_RADAM_RECT];
    const T bias_correction2_sqrt = h[FO_RADAM_BIAS_CORRECTION2_SQRT];
    const T eps = h[FO_RADAM_EPS];
    const T m_hat = m / bias_correction1;
    if (rectify > T(0)) {
        p = p - m_hat * lr * (bias_correction2_sqrt / (fo_sqrt(v) + eps)) * rect;
    } else {
        p = p - m_hat * lr;
    }
}

// -------------------------------------------------------------------------------------------
// Rprop.
// State slots: prev (the previous, possibly zeroed, gradient), step_size.

template <typename T>
FO_HD void rprop(T& p, T g, T& prev, T& step_size, const T* h) {
    const T gsign = h[FO_RPROP_GSIGN];
    const T etaminus = h[FO_RPROP_ETAMINUS];
    const T etaplus = h[FO_RPROP_ETAPLUS];
    const T step_size_min = h[FO_RPROP_STEP_SIZE_MIN];
    const T step_size_max = h[FO_RPROP_STEP_SIZE_MAX];
    const T zero = h[FO_RPROP_ZERO];
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
// Yogi (Zaheer et al., NeurIPS 2018); with bias correction (optax.yogi) when the host passes
// step_size = lr / (1 - beta1^t) and bias_correction2_sqrt = sqrt(1 - beta2^t), else lr and 1.

template <typename T>
FO_HD void yogi(T& p, T g, T& m, T& v, const T* h) {
    const T step_size = h[FO_YOGI_STEP_SIZE];
    const T weight_decay = h[FO_YOGI_WEIGHT_DECAY];
    const T gsign = h[FO_YOGI_GSIGN];
    const T beta1 = h[FO_YOGI_BETA1];
    const T one_minus_beta1 = h[FO_YOGI_ONE_MINUS_BETA1];
    const T one_minus_beta2 = h[FO_YOGI_ONE_MINUS_BETA2];
    const T bias_correction2_sqrt = h[FO_YOGI_BIAS_CORRECTION2_SQRT];
    const T eps = h[FO_YOGI_EPS];
    g = l2_grad(p, g, gsign, weight_decay);
    m = one_minus_beta1 * g + beta1 * m;
    const T g2 = g * g;
    if (v > g2) {
        v = v - one_minus_beta2 * g2;
    } else if (v < g2) {
        v = v + one_minus_beta2 * g2;
    }
    p = p - step_size * (m / (fo_sqrt(v) / bias_correction2_sqrt + eps));
}

// -------------------------------------------------------------------------------------------
// Lion (Chen et al., 2023; optax.lion).

template <typename T>
FO_HD void lion(T& p, T g, T& m, const T* h) {
    const T decay = h[FO_LION_DECAY];
    const T lr = h[FO_LION_LR];
    const T gsign = h[FO_LION_GSIGN];
    const T beta1 = h[FO_LION_BETA1];
    const T one_minus_beta1 = h[FO_LION_ONE_MINUS_BETA1];
    const T beta2 = h[FO_LION_BETA2];
    const T one_minus_beta2 = h[FO_LION_ONE_MINUS_BETA2];
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
// The average takes the parameter slot, the parameter the gradient slot.

template <typename T>
FO_HD void ema(T& avg, T p, const T* h) {
    const T one_minus_decay = h[FO_EMA_ONE_MINUS_DECAY];
    const T decay = h[FO_EMA_DECAY];
    avg = lerp(avg, p, one_minus_decay, decay);
}

// -------------------------------------------------------------------------------------------
// ASGD (torch.optim.ASGD): decay = 1 - lambd * eta; average = 0 while mu = 1 (ax copies p).

template <typename T>
FO_HD void asgd(T& p, T g, T& ax, const T* h) {
    const T decay = h[FO_ASGD_DECAY];
    const T eta = h[FO_ASGD_ETA];
    const T weight_decay = h[FO_ASGD_WEIGHT_DECAY];
    const T gsign = h[FO_ASGD_GSIGN];
    const T mu = h[FO_ASGD_MU];
    const T average = h[FO_ASGD_AVERAGE];
    g = l2_grad(p, g, gsign, weight_decay);
    p = p * decay;
    p = p - eta * g;
    if (average > T(0)) {
        ax = ax + (p - ax) * mu;
    } else {
        ax = p;
    }
}

// -------------------------------------------------------------------------------------------
// Schedule-free SGD / AdamW (Defazio et al., 2024; the schedulefree package). p holds y.

template <typename T>
FO_HD void schedulefree_apply(T& y, T g, T& z, const T* h) {
    const T lr = h[FO_SCHEDULEFREE_LR];
    const T weight_decay = h[FO_SCHEDULEFREE_WEIGHT_DECAY];
    const T ckp1 = h[FO_SCHEDULEFREE_CKP1];
    const T one_minus_ckp1 = h[FO_SCHEDULEFREE_ONE_MINUS_CKP1];
    const T y_step = h[FO_SCHEDULEFREE_Y_STEP];
    if (weight_decay != T(0)) {
        g = g + weight_decay * y;
    }
    y = lerp(y, z, ckp1, one_minus_ckp1);
    y = y + y_step * g;
    z = z - lr * g;
}

template <typename T>
FO_HD void sf_sgd(T& y, T g, T& z, const T* h) {
    schedulefree_apply(y, g, z, h);
}

template <typename T>
FO_HD void sf_adamw(T& y, T g, T& z, T& v, const T* h) {
    const T beta2 = h[FO_SF_ADAMW_BETA2];
    const T one_minus_beta2 = h[FO_SF_ADAMW_ONE_MINUS_BETA2];
    const T bias_correction2 = h[FO_SF_ADAMW_BIAS_CORRECTION2];
    const T eps = h[FO_SF_ADAMW_EPS];
    v = second_moment(v, g, beta2, one_minus_beta2);
    schedulefree_apply(y, g / (fo_sqrt(v / bias_correction2) + eps), z, h);
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
