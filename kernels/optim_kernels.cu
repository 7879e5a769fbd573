// fastopt CuPy kernels: one `extern "C" __global__` wrapper per rule of rules.cuh and dtype,
// e.g. adam_f32 / adam_f64. The rule math lives only in rules.cuh; this file is the loop.
//
// Kernel signature (k = number of state slots of the rule, 0..3):
//   name_f32(float* p, const float* g, float* s_0, ..., float* s_{k-1},
//            long long n, int vectorize, fo::Scalars<float> h, float gscale, float clip)
// h holds the rule's scalar tuple (rules.py order) padded to FO_MAX_SCALARS; (gscale, clip) is
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
// can be compiled for one dtype only.

#include "rules.cuh"

#ifndef FO_ENABLE_F32
#define FO_ENABLE_F32 1
#endif
#ifndef FO_ENABLE_F64
#define FO_ENABLE_F64 1
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

#if FO_ENABLE_F32
#define FO_KERNEL_F32(name, nstates, nscalars) FO_KERNEL(name, nstates, float, f32)
FO_RULES(FO_KERNEL_F32)
#endif

#if FO_ENABLE_F64
#define FO_KERNEL_F64(name, nstates, nscalars) FO_KERNEL(name, nstates, double, f64)
FO_RULES(FO_KERNEL_F64)
#endif
