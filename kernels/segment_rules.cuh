// The per-segment rules of kernels/rules.py (SEGMENT_RULES: segment_norms, lamb, lars, novograd)
// in CUDA C, for the CuPy segment kernels (segment_kernels.cu), with the scalar fields read by
// name as in rules.cuh: h[FO_LAMB_BETA1] (rules_layout.cuh, generated from rules.py).
//
// Each rule is a struct with three `__host__ __device__` functions, as rules.py's three:
//   pre(p, g, s0, s1, h, flags, x, y)        the two values whose squares are summed per segment
//   segment(sx, sy, flags, st, h, r0, r1)    the segment's scalars (float64), st its scalar state
//   update(p, g, s0, s1, h, flags, r0, r1)   the elementwise update (state slots by reference)
// plus `slots`, the number of element state slots of update (SEGMENT_RULES), and `pre_slots`,
// those that pre reads.
//
// Rounding: the target is numba-cuda's compilation of rules.py for a GPU, so that the CuPy and
// numba-cuda segment kernels give the same bits. NVVM (libNVVM, its default -fma=1) turns some
// `a * b + c` of the rules into one fma.rn and leaves every other product and sum as a PTX
// mul/add/sub without a rounding modifier (which ptxas may still contract when it assembles).
// The arithmetic type nv<F> emits exactly those instructions on the device: + - * as plain
// add/sub/mul.f32|f64 (no .rn, no .ftz: CuPy compiles with -ftz=true, and inline PTX keeps it
// out), / and sqrt as div.rn and sqrt.rn, comparisons as ordered setp (!= unordered, as
// Python); and mad(a, b, c) is one fma.rn.F at each place where NVVM fuses (read from the PTX
// numba-cuda 0.30 emits for segment_loops.py's kernels on sm_90; written out at each use). The
// module is compiled with --fmad=true, so ptxas treats the unrounded instructions as the
// driver's JIT treats numba-cuda's.
// On the host, nv<F> is plain C arithmetic and mad(a, b, c) is a * b + c with two roundings:
// the numba-cpu rules, bit for bit (tests/segment_host_harness.cu checks it).
//
// No standard #include (NVRTC); segment_kernels.cu includes this after optim_kernels.cu.

#ifndef FASTOPT_SEGMENT_RULES_CUH
#define FASTOPT_SEGMENT_RULES_CUH

#include "rules.cuh"

// The segment flag bits of rules.py (FLAG_DECAY, FLAG_TRUST).
#define FO_FLAG_DECAY 1
#define FO_FLAG_TRUST 2

namespace fo {
namespace seg {

template <typename F>
struct nv {
    F v;
    FO_HD nv() {}
    FO_HD explicit nv(F x) : v(x) {}
};

#if defined(__CUDA_ARCH__)
#define FO_NV_BINOP(F, OP, PTX, C)                                        \
    FO_HD nv<F> operator OP(nv<F> a, nv<F> b) {                           \
        F r;                                                              \
        asm(PTX " %0, %1, %2;" : "=" C(r) : C(a.v), C(b.v));              \
        return nv<F>(r);                                                  \
    }
#define FO_NV_CMP(F, OP, PTX, C)                                          \
    FO_HD bool operator OP(nv<F> a, nv<F> b) {                            \
        unsigned r;                                                       \
        asm("{\n\t.reg .pred fo_p;\n\t" PTX " fo_p, %1, %2;\n\t"          \
            "selp.u32 %0, 1, 0, fo_p;\n\t}"                               \
            : "=r"(r) : C(a.v), C(b.v));                                  \
        return r != 0u;                                                   \
    }
#define FO_NV_UNARY(F, NAME, PTX, C)                                      \
    FO_HD nv<F> NAME(nv<F> a) {                                           \
        F r;                                                              \
        asm(PTX " %0, %1;" : "=" C(r) : C(a.v));                          \
        return nv<F>(r);                                                  \
    }
#define FO_NV_MAD(F, PTX, C)                                              \
    FO_HD nv<F> mad(nv<F> a, nv<F> b, nv<F> c) {                          \
        F r;                                                              \
        asm(PTX " %0, %1, %2, %3;" : "=" C(r) : C(a.v), C(b.v), C(c.v));  \
        return nv<F>(r);                                                  \
    }
#else
#define FO_NV_BINOP(F, OP, PTX, C) \
    FO_HD nv<F> operator OP(nv<F> a, nv<F> b) { return nv<F>(a.v OP b.v); }
#define FO_NV_CMP(F, OP, PTX, C) \
    FO_HD bool operator OP(nv<F> a, nv<F> b) { return a.v OP b.v; }
#define FO_NV_UNARY(F, NAME, PTX, C) \
    FO_HD nv<F> NAME(nv<F> a) { return nv<F>(fo::NAME(a.v)); }
#define FO_NV_MAD(F, PTX, C) \
    FO_HD nv<F> mad(nv<F> a, nv<F> b, nv<F> c) { return nv<F>(a.v * b.v + c.v); }
#endif

#define FO_NV_TYPE(F, S, C)                      \
    FO_NV_BINOP(F, +, "add." S, C)               \
    FO_NV_BINOP(F, -, "sub." S, C)               \
    FO_NV_BINOP(F, *, "mul." S, C)               \
    FO_NV_BINOP(F, /, "div.rn." S, C)            \
    FO_NV_CMP(F, <, "setp.lt." S, C)             \
    FO_NV_CMP(F, >, "setp.gt." S, C)             \
    FO_NV_CMP(F, ==, "setp.eq." S, C)            \
    FO_NV_CMP(F, !=, "setp.neu." S, C)           \
    FO_NV_UNARY(F, fo_sqrt, "sqrt.rn." S, C)     \
    FO_NV_MAD(F, "fma.rn." S, C)

FO_NV_TYPE(float, "f32", "f")
FO_NV_TYPE(double, "f64", "d")

#undef FO_NV_TYPE
#undef FO_NV_BINOP
#undef FO_NV_CMP
#undef FO_NV_UNARY
#undef FO_NV_MAD

// -x, exact (neg.F: a C negation of a float would get .ftz under CuPy's -ftz=true).
FO_HD nv<float> neg(nv<float> a) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("neg.f32 %0, %1;" : "=f"(r) : "f"(a.v));
    return nv<float>(r);
#else
    return nv<float>(-a.v);
#endif
}
FO_HD nv<double> neg(nv<double> a) { return nv<double>(-a.v); }

// rules.py's transformed_grad: g * gscale, clamped to [-clip, clip] when clip > 0.
template <typename F>
FO_HD nv<F> transformed_grad(nv<F> g, nv<F> gscale, nv<F> clip) {
    g = g * gscale;
    if (clip > nv<F>(F(0))) {
        const nv<F> lo = neg(clip);
        if (g < lo) return lo;
        if (g > clip) return clip;
    }
    return g;
}

// rules.py's trust_ratio: tc * |p| / (|u| + eps), 1 when either norm is 0 (float64).
FO_HD nv<double> trust_ratio(nv<double> pn, nv<double> un, nv<double> tc, nv<double> eps) {
    const nv<double> zero(0.0);
    if (pn == zero || un == zero) return nv<double>(1.0);
    return tc * pn / (un + eps);
}

// flags & FLAG_DECAY and weight_decay != 0.
template <typename F>
FO_HD bool decays(int flags, nv<F> wd) {
    return (flags & FO_FLAG_DECAY) && wd != nv<F>(F(0));
}

// ---------------------------------------------------------------------------------------------
// segment_norms: the sums of squares of the parameter and of the (signed) gradient.

struct SegmentNorms {
    static const int slots = 0, pre_slots = 0;
    template <typename F>
    static FO_HD void pre(nv<F> p, nv<F> g, nv<F>, nv<F>, const nv<F>* h, int, nv<F>& x,
                          nv<F>& y) {
        x = p;
        y = h[FO_SEGMENT_NORMS_GSIGN] * g;
    }
    static FO_HD void segment(nv<double> sx, nv<double> sy, int, nv<double>& st,
                              const nv<double>*, nv<double>& r0, nv<double>& r1) {
        r0 = sx;
        r1 = sy;
        (void)st;
    }
    template <typename F>
    static FO_HD void update(nv<F>&, nv<F>, nv<F>&, nv<F>&, const nv<F>*, int, nv<F>, nv<F>) {}
};

// ---------------------------------------------------------------------------------------------
// LAMB (rules.py lamb_direction / lamb_pre / lamb_segment / lamb).

template <typename F>
FO_HD nv<F> lamb_direction(nv<F> p, nv<F> g, nv<F>& m, nv<F>& v, const nv<F>* h, int flags) {
    g = h[FO_LAMB_GSIGN] * g;
    m = mad(m, h[FO_LAMB_BETA1], h[FO_LAMB_ONE_MINUS_BETA1] * g);  // fused: beta1 * m
    v = mad(v, h[FO_LAMB_BETA2], h[FO_LAMB_ONE_MINUS_BETA2] * (g * g));  // fused: beta2 * v
    nv<F> u = m / (h[FO_LAMB_BIAS_CORRECTION1] *
                   (fo_sqrt(v / h[FO_LAMB_BIAS_CORRECTION2] + h[FO_LAMB_EPS_ROOT]) + h[FO_LAMB_EPS]));
    if (decays(flags, h[FO_LAMB_WEIGHT_DECAY])) {
        u = mad(p, h[FO_LAMB_WEIGHT_DECAY], u);  // fused: u + wd * p
    }
    return u;
}

struct Lamb {
    static const int slots = 2, pre_slots = 2;
    template <typename F>
    static FO_HD void pre(nv<F> p, nv<F> g, nv<F> m, nv<F> v, const nv<F>* h, int flags,
                          nv<F>& x, nv<F>& y) {
        x = p;
        y = lamb_direction(p, g, m, v, h, flags);
    }
    static FO_HD void segment(nv<double> sx, nv<double> sy, int, nv<double>&,
                              const nv<double>* h, nv<double>& r0, nv<double>& r1) {
        const nv<double> ratio = trust_ratio(fo_sqrt(sx), fo_sqrt(sy), nv<double>(1.0),
                                             nv<double>(0.0));
        r0 = h[FO_LAMB_LR] * ratio;
        r1 = nv<double>(0.0);
    }
    template <typename F>
    static FO_HD void update(nv<F>& p, nv<F> g, nv<F>& m, nv<F>& v, const nv<F>* h, int flags,
                             nv<F> r0, nv<F>) {
        const nv<F> u = lamb_direction(p, g, m, v, h, flags);
        p = p - r0 * u;
    }
};

// ---------------------------------------------------------------------------------------------
// LARS (rules.py lars_pre / lars_segment / lars).

template <typename F>
FO_HD nv<F> lars_direction(nv<F> p, nv<F> g, const nv<F>* h, int flags) {
    nv<F> u = h[FO_LARS_GSIGN] * g;
    if (decays(flags, h[FO_LARS_WEIGHT_DECAY])) {
        u = mad(p, h[FO_LARS_WEIGHT_DECAY], u);  // fused: u + wd * p
    }
    return u;
}

struct Lars {
    static const int slots = 1, pre_slots = 0;
    template <typename F>
    static FO_HD void pre(nv<F> p, nv<F> g, nv<F>, nv<F>, const nv<F>* h, int flags, nv<F>& x,
                          nv<F>& y) {
        x = p;
        y = lars_direction(p, g, h, flags);
    }
    static FO_HD void segment(nv<double> sx, nv<double> sy, int flags, nv<double>&,
                              const nv<double>* h, nv<double>& r0, nv<double>& r1) {
        if (flags & FO_FLAG_TRUST) {
            r0 = h[FO_LARS_LR] * trust_ratio(fo_sqrt(sx), fo_sqrt(sy),
                                             h[FO_LARS_TRUST_COEFFICIENT], h[FO_LARS_EPS]);
        } else {
            r0 = h[FO_LARS_LR] * nv<double>(1.0);
        }
        r1 = nv<double>(0.0);
    }
    template <typename F>
    static FO_HD void update(nv<F>& p, nv<F> g, nv<F>& buf, nv<F>&, const nv<F>* h, int flags,
                             nv<F> r0, nv<F>) {
        const nv<F> u = lars_direction(p, g, h, flags);
        const nv<F> momentum = h[FO_LARS_MOMENTUM];
        const nv<F> s = r0 * u;
        buf = mad(buf, momentum, s);  // fused: s + momentum * buf
        if (h[FO_LARS_NESTEROV] > nv<F>(F(0))) {
            p = p - mad(r0, u, buf * momentum);  // fused: s + momentum * buf, s recomputed
        } else {
            p = p - buf;
        }
    }
};

// ---------------------------------------------------------------------------------------------
// NovoGrad (rules.py novograd_pre / novograd_segment / novograd).

struct Novograd {
    static const int slots = 1, pre_slots = 0;
    template <typename F>
    static FO_HD void pre(nv<F>, nv<F> g, nv<F>, nv<F>, const nv<F>* h, int, nv<F>& x,
                          nv<F>& y) {
        x = h[FO_NOVOGRAD_GSIGN] * g;
        y = x;
    }
    static FO_HD void segment(nv<double> sx, nv<double>, int, nv<double>& nu,
                              const nv<double>* h, nv<double>& r0, nv<double>& r1) {
        if (h[FO_NOVOGRAD_FIRST] > nv<double>(0.0)) {
            nu = sx;
        } else {
            // fused: (1 - beta2) * sx
            nu = mad(h[FO_NOVOGRAD_ONE_MINUS_BETA2], sx, h[FO_NOVOGRAD_BETA2] * nu);
        }
        r0 = fo_sqrt(nu + h[FO_NOVOGRAD_EPS_ROOT]) + h[FO_NOVOGRAD_EPS];
        r1 = nv<double>(0.0);
    }
    template <typename F>
    static FO_HD void update(nv<F>& p, nv<F> g, nv<F>& m, nv<F>&, const nv<F>* h, int flags,
                             nv<F> r0, nv<F>) {
        nv<F> u = (h[FO_NOVOGRAD_GSIGN] * g) / r0;
        if (decays(flags, h[FO_NOVOGRAD_WEIGHT_DECAY])) {
            u = mad(p, h[FO_NOVOGRAD_WEIGHT_DECAY], u);  // fused: u + wd * p
        }
        if (h[FO_NOVOGRAD_FIRST] == nv<F>(F(0))) {
            u = mad(m, h[FO_NOVOGRAD_BETA1], u);  // fused: beta1 * m + u
        }
        p = p - h[FO_NOVOGRAD_LR] * u;
        m = u;
    }
};

}  // namespace seg
}  // namespace fo

// X(name, struct): the per-segment rules, in rules.SEGMENT_RULES order.
#define FO_SEGMENT_RULES(X)          \
    X(segment_norms, SegmentNorms)   \
    X(lamb, Lamb)                    \
    X(lars, Lars)                    \
    X(novograd, Novograd)

#endif  // FASTOPT_SEGMENT_RULES_CUH
