// fastopt CuPy kernels: one `extern "C" __global__` wrapper per rule of rules.cuh and dtype,
// e.g. adam_f32 / adam_f64. The rule math lives only in rules.cuh; this file is the loop.
//
// Kernel signature (k = number of state slots of the rule, 0..3):
//   name_f32(float* p, const float* g, float* s_0, ..., float* s_{k-1},
//            long long n, int vectorize, fo::Scalars<float> h, float gscale, float clip)
// h holds the rule's scalars (rules.py's declared order) padded to FO_MAX_SCALARS; (gscale, clip) is
// the pair `gs` of kernels/cpu.py: every gradient goes through fo::transformed_grad before the
// rule, as in the Numba loops. All scalars are passed by value.
//
// Loop: grid-stride over 64-bit indices. When `vectorize` is set and every pointer is 16-byte
// aligned (checked again here, so a wrong flag cannot fault), elements are moved as float4 /
// double2 (one 16-byte load per array per lane group), then a scalar loop does the n % width
// tail; otherwise the scalar loop does everything. Every element is read and written once by
// one thread, so the result does not depend on the launch configuration.
//
// Arrays must not overlap (they are declared __restrict__).
//
// FO_ENABLE_F32 / FO_ENABLE_F64 (default 1) select which dtypes are instantiated, so a module
// can be compiled for one dtype only. FO_ENABLE_RULES (default 1) and FO_ENABLE_REDUCTIONS
// (default 0) select the update kernels and the reduction kernels (end of this file); the CuPy
// backend compiles the two sets as separate modules.

#include "rules.cuh"

#ifndef FO_ENABLE_F32
#define FO_ENABLE_F32 1
#endif
#ifndef FO_ENABLE_F64
#define FO_ENABLE_F64 1
#endif
#ifndef FO_ENABLE_RULES
#define FO_ENABLE_RULES 1
#endif
#ifndef FO_ENABLE_REDUCTIONS
#define FO_ENABLE_REDUCTIONS 0
#endif

namespace fo {

template <typename F>
struct vec16;

template <>
struct vec16<float> {
    typedef float4 type;
    static const int width = 4;
};

template <>
struct vec16<double> {
    typedef double2 type;
    static const int width = 2;
};

template <typename F>
union lanes {
    typename vec16<F>::type v;
    F a[vec16<F>::width];
};

__device__ __forceinline__ bool aligned16(const void* ptr) {
    return (reinterpret_cast<unsigned long long>(ptr) & 15ull) == 0ull;
}

// The one loop, shared by every rule: NS state slots (unused pointers are null).
template <typename F, int NS, class Op>
__device__ __forceinline__ void run(F* __restrict__ p, const F* __restrict__ g,
                                    F* __restrict__ s0, F* __restrict__ s1,
                                    F* __restrict__ s2, long long n, int vectorize,
                                    const Scalars<F>& hs, F gscale_, F clip_) {
    typedef ieee<F> T;
    typedef typename vec16<F>::type V;
    const int W = vec16<F>::width;

    T h[FO_MAX_SCALARS];
#pragma unroll
    for (int k = 0; k < FO_MAX_SCALARS; ++k) {
        h[k] = T(hs.v[k]);
    }
    const T gscale(gscale_), clip(clip_);

    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;

    bool vec = vectorize != 0 && aligned16(p) && aligned16(g);
    if (NS > 0) vec = vec && aligned16(s0);
    if (NS > 1) vec = vec && aligned16(s1);
    if (NS > 2) vec = vec && aligned16(s2);

    if (vec) {
        const long long nvec = n / W;
        for (long long i = start; i < nvec; i += stride) {
            lanes<F> pl, gl, sl[NS > 0 ? NS : 1];
            pl.v = reinterpret_cast<const V*>(p)[i];
            gl.v = reinterpret_cast<const V*>(g)[i];
            if (NS > 0) sl[0].v = reinterpret_cast<const V*>(s0)[i];
            if (NS > 1) sl[1].v = reinterpret_cast<const V*>(s1)[i];
            if (NS > 2) sl[2].v = reinterpret_cast<const V*>(s2)[i];
#pragma unroll
            for (int k = 0; k < W; ++k) {
                T pk(pl.a[k]);
                T s[NS > 0 ? NS : 1];
#pragma unroll
                for (int j = 0; j < NS; ++j) s[j] = T(sl[j].a[k]);
                Op::apply(pk, transformed_grad(T(gl.a[k]), gscale, clip), s, h);
                pl.a[k] = pk.v;
#pragma unroll
                for (int j = 0; j < NS; ++j) sl[j].a[k] = s[j].v;
            }
            reinterpret_cast<V*>(p)[i] = pl.v;
            if (NS > 0) reinterpret_cast<V*>(s0)[i] = sl[0].v;
            if (NS > 1) reinterpret_cast<V*>(s1)[i] = sl[1].v;
            if (NS > 2) reinterpret_cast<V*>(s2)[i] = sl[2].v;
        }
        done = nvec * W;
    }

    for (long long i = done + start; i < n; i += stride) {
        T pk(p[i]);
        T s[NS > 0 ? NS : 1];
        if (NS > 0) s[0] = T(s0[i]);
        if (NS > 1) s[1] = T(s1[i]);
        if (NS > 2) s[2] = T(s2[i]);
        Op::apply(pk, transformed_grad(T(g[i]), gscale, clip), s, h);
        p[i] = pk.v;
        if (NS > 0) s0[i] = s[0].v;
        if (NS > 1) s1[i] = s[1].v;
        if (NS > 2) s2[i] = s[2].v;
    }
}

}  // namespace fo

// Kernel parameter lists and the matching run() calls, one pair per number of state slots.
#define FO_PARAMS_0(F) F* __restrict__ p, const F* __restrict__ g
#define FO_PARAMS_1(F) FO_PARAMS_0(F), F* __restrict__ s0
#define FO_PARAMS_2(F) FO_PARAMS_1(F), F* __restrict__ s1
#define FO_PARAMS_3(F) FO_PARAMS_2(F), F* __restrict__ s2
#define FO_STATES_0 0, 0, 0
#define FO_STATES_1 s0, 0, 0
#define FO_STATES_2 s0, s1, 0
#define FO_STATES_3 s0, s1, s2

#define FO_KERNEL(name, nstates, F, suffix)                                                  \
    extern "C" __global__ void name##_##suffix(FO_PARAMS_##nstates(F), long long n,          \
                                               int vectorize, fo::Scalars<F> h, F gscale,    \
                                               F clip) {                                     \
        fo::run<F, nstates, fo::op_##name>(p, g, FO_STATES_##nstates, n, vectorize, h, gscale, \
                                           clip);                                            \
    }

#if FO_ENABLE_RULES && FO_ENABLE_F32
#define FO_KERNEL_F32(name, nstates, nscalars) FO_KERNEL(name, nstates, float, f32)
FO_RULES(FO_KERNEL_F32)
#endif

#if FO_ENABLE_RULES && FO_ENABLE_F64
#define FO_KERNEL_F64(name, nstates, nscalars) FO_KERNEL(name, nstates, double, f64)
FO_RULES(FO_KERNEL_F64)
#endif

// -------------------------------------------------------------------------------------------
// Reductions: the sum of squares of an array in double and whether any element is NaN or
// +-Inf (kernels/cpu.py sumsq_and_finite; the gradient norm of clipping and the finiteness
// check of non-finite skipping). Deterministic, whatever the grid:
//
//   fo_sumsq_partials_f32/_f64(const F* x, long long n, double* sq, int* bad)
//     chunk c = [c * CHUNK, min((c + 1) * CHUNK, n)) is reduced by one block (block b takes
//     chunks b, b + gridDim.x, ...): thread t adds x[lo + t]^2, x[lo + t + T]^2, ... in index
//     order, then the block adds its T sums pairwise (s[t] += s[t + half], half = T/2, ..., 1);
//     sq[c] and bad[c] get the chunk's sum and flag. Launch with blockDim.x == T.
//   fo_sumsq_finish(const double* sq, const int* bad, long long m, double* out)
//     one block of T threads: the same over the m partials; out[0] = the sum, out[1] = 1 if
//     any element was not finite, else 0.
//
// Every operation is an explicitly rounded IEEE one (fo::ieee<double>), so the result depends
// only on n and T: the host harness in the tests reproduces it bit for bit.

#if FO_ENABLE_REDUCTIONS

// FO_REDUCTION_CHUNK and FO_REDUCTION_THREADS come from rules_layout.cuh (kernels/layout.py).

namespace fo {

// float -> double without flushing subnormals (cvt without .ftz; CuPy compiles with -ftz=true).
FO_HD double widen(float x) {
#if defined(__CUDA_ARCH__)
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
    return r;
#else
    return (double)x;
#endif
}
FO_HD double widen(double x) { return x; }

// Thread t's share of chunk [lo, hi): sum of x[i]^2 for i = lo + t, lo + t + T, ... < hi, in
// that order, and whether any x[i] is non-finite (x - x is 0 only for finite x).
template <typename F>
FO_HD void sumsq_lane(const F* x, long long lo, long long hi, int t, double& sq, int& bad) {
    typedef ieee<double> D;
    const D zero(0.0);
    D acc(0.0);
    int flag = 0;
    for (long long i = lo + t; i < hi; i += FO_REDUCTION_THREADS) {
        const D v(widen(x[i]));
        acc = acc + v * v;
        flag |= (v - v) != zero ? 1 : 0;
    }
    sq = acc.v;
    bad = flag;
}

// Thread t's share of the partials: sum of v[i] and OR of flags[i] for i = t, t + T, ... < m.
FO_HD void sum_lane(const double* v, const int* flags, long long m, int t, double& s, int& bad) {
    typedef ieee<double> D;
    D acc(0.0);
    int flag = 0;
    for (long long i = t; i < m; i += FO_REDUCTION_THREADS) {
        acc = acc + D(v[i]);
        flag |= flags[i];
    }
    s = acc.v;
    bad = flag;
}

// One level of the block's tree: s[t] += s[t + half] for t < half.
FO_HD void tree_level(double* s, int* b, int t, int half) {
    if (t < half) {
        s[t] = (ieee<double>(s[t]) + ieee<double>(s[t + half])).v;
        b[t] |= b[t + half];
    }
}

template <typename F>
__device__ __forceinline__ void sumsq_partials(const F* __restrict__ x, long long n,
                                               double* __restrict__ sq, int* __restrict__ bad) {
    __shared__ double s[FO_REDUCTION_THREADS];
    __shared__ int b[FO_REDUCTION_THREADS];
    const int t = threadIdx.x;
    const long long nchunks = (n + (FO_REDUCTION_CHUNK - 1)) / FO_REDUCTION_CHUNK;
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const long long lo = c * FO_REDUCTION_CHUNK;
        const long long hi = lo + FO_REDUCTION_CHUNK < n ? lo + FO_REDUCTION_CHUNK : n;
        sumsq_lane(x, lo, hi, t, s[t], b[t]);
        __syncthreads();
        for (int half = FO_REDUCTION_THREADS / 2; half > 0; half >>= 1) {
            tree_level(s, b, t, half);
            __syncthreads();
        }
        if (t == 0) {
            sq[c] = s[0];
            bad[c] = b[0];
        }
        __syncthreads();  // s and b are reused by the next chunk
    }
}

}  // namespace fo

#if FO_ENABLE_F32
extern "C" __global__ void fo_sumsq_partials_f32(const float* __restrict__ x, long long n,
                                                 double* __restrict__ sq, int* __restrict__ bad) {
    fo::sumsq_partials<float>(x, n, sq, bad);
}
#endif

#if FO_ENABLE_F64
extern "C" __global__ void fo_sumsq_partials_f64(const double* __restrict__ x, long long n,
                                                 double* __restrict__ sq, int* __restrict__ bad) {
    fo::sumsq_partials<double>(x, n, sq, bad);
}
#endif

extern "C" __global__ void fo_sumsq_finish(const double* __restrict__ sq,
                                           const int* __restrict__ bad, long long m,
                                           double* __restrict__ out) {
    __shared__ double s[FO_REDUCTION_THREADS];
    __shared__ int b[FO_REDUCTION_THREADS];
    const int t = threadIdx.x;
    fo::sum_lane(sq, bad, m, t, s[t], b[t]);
    __syncthreads();
    for (int half = FO_REDUCTION_THREADS / 2; half > 0; half >>= 1) {
        fo::tree_level(s, b, t, half);
        __syncthreads();
    }
    if (t == 0) {
        out[0] = s[0];
        out[1] = b[0] != 0 ? 1.0 : 0.0;
    }
}

#endif  // FO_ENABLE_REDUCTIONS
