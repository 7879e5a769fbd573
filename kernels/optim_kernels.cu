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
// can be compiled for one dtype only. FO_ENABLE_RULES (default 1), FO_ENABLE_REDUCTIONS
// (default 0) and FO_ENABLE_STORAGE (default 0) select the update kernels, the reduction kernels
// and the storage kernels (end of this file); the CuPy backend compiles the sets as separate
// modules.

#include "rules.cuh"
#include "storage.cuh"

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
#ifndef FO_ENABLE_STORAGE
#define FO_ENABLE_STORAGE 0
#endif
#ifndef FO_ENABLE_REDUCTIONS_16
#define FO_ENABLE_REDUCTIONS_16 0
#endif

namespace fo {

// 16-bit floats as their bits, told apart by type (storage.cuh converts them).
struct bf16_bits {
    unsigned short v;
};
struct f16_bits {
    unsigned short v;
};

// Exact float -> double and double -> float rounded to nearest even, without flushing
// subnormals (plain cvt: CuPy compiles with -ftz=true, which would add .ftz to a C cast).
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
FO_HD double widen(bf16_bits x) { return widen(bf16_to_f32(x.v)); }
FO_HD double widen(f16_bits x) { return widen(f16_to_f32(x.v)); }

FO_HD float narrow(double x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
    return r;
#else
    return (float)x;
#endif
}

FO_HD void convert(float& out, float x) { out = x; }
FO_HD void convert(float& out, double x) { out = narrow(x); }
FO_HD void convert(double& out, float x) { out = widen(x); }
FO_HD void convert(double& out, double x) { out = x; }

}  // namespace fo

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

// widen() (top of this file) reads an element as a double: exact for float and the 16-bit
// formats, without flushing subnormals.

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

// The partials of 16-bit arrays (uint16 bits; FO_ENABLE_REDUCTIONS_16, a module of their own).
#if FO_ENABLE_REDUCTIONS_16
extern "C" __global__ void fo_sumsq_partials_bf16(const unsigned short* __restrict__ x,
                                                  long long n, double* __restrict__ sq,
                                                  int* __restrict__ bad) {
    fo::sumsq_partials<fo::bf16_bits>(reinterpret_cast<const fo::bf16_bits*>(x), n, sq, bad);
}

extern "C" __global__ void fo_sumsq_partials_f16(const unsigned short* __restrict__ x,
                                                 long long n, double* __restrict__ sq,
                                                 int* __restrict__ bad) {
    fo::sumsq_partials<fo::f16_bits>(reinterpret_cast<const fo::f16_bits*>(x), n, sq, bad);
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

// -------------------------------------------------------------------------------------------
// Storage kernels (the precision issue): the loop for arrays stored in another dtype than the
// rule computes in, kernels/loops.py's storage loops and kernels/access.py's element access in
// CUDA C. One template, instantiated per (rule, compute type C, element types of the parameter,
// gradient and state, master copy, stochastic rounding); the CuPy backend names the one it needs
// (cupy.RawModule name_expressions), e.g.
//
//   fo::storage_kernel<fo::op_adam, float, fo::bf16_bits, float, fo::bf16_bits, true, false>
//     (P* p, float* w, const G* g, S* s0, S* s1, S* s2, long long n, fo::Scalars<C> h,
//      C gscale, C clip, unsigned long long seed, unsigned long long step,
//      unsigned long long index0)
//
// Element types: float, double, fo::bf16_bits, fo::f16_bits (uint16 arrays of bits). Loads
// widen to C (exact), stores round: C -> float to nearest even (the only inexact cast is double
// -> float, when the rule computes in double), then float -> 16 bits to nearest even or, with
// SR, stochastically with word k of random_bits4(seed, step, index0 + i) (k = 0 the parameter,
// 1 + j state slot j). With MASTER the parameter is read from the float32 copy w and written to
// both. Unused state pointers may be null; the rule itself is rules.cuh's, called unchanged.
// A thread takes aligned packs of FO_PACK elements (storage_pack) while every array is aligned
// to its pack, then single elements (storage_element); both bodies are __host__ __device__ so
// that the host harness (tests/storage_loop_host_harness.cu) runs them in the kernel's order and
// checks them against the Numba CPU storage kernels.

#if FO_ENABLE_STORAGE

namespace fo {

template <typename E>
struct element {  // float, double
    template <typename C>
    static FO_HD C load(E x) {
        C r;
        convert(r, x);
        return r;
    }
    template <bool SR, typename C>
    static FO_HD E store(C x, unsigned int) {
        E r;
        convert(r, x);
        return r;
    }
};

// The two 16-bit formats differ only in their conversions: one element policy over a format.
struct bf16_format {
    static FO_HD float widen(unsigned short v) { return bf16_to_f32(v); }
    static FO_HD unsigned short rne(float v) { return f32_to_bf16_rne(v); }
    static FO_HD unsigned short sr(float v, unsigned int r) { return f32_to_bf16_sr(v, r); }
};

struct f16_format {
    static FO_HD float widen(unsigned short v) { return f16_to_f32(v); }
    static FO_HD unsigned short rne(float v) { return f32_to_f16_rne(v); }
    static FO_HD unsigned short sr(float v, unsigned int r) { return f32_to_f16_sr(v, r); }
};

template <typename Bits, typename Format>
struct element16 {
    template <typename C>
    static FO_HD C load(Bits x) {
        C r;
        convert(r, Format::widen(x.v));
        return r;
    }
    template <bool SR, typename C>
    static FO_HD Bits store(C x, unsigned int rbits) {
        float v;
        convert(v, x);
        Bits out;
        out.v = SR ? Format::sr(v, rbits) : Format::rne(v);
        return out;
    }
};

template <>
struct element<bf16_bits> : element16<bf16_bits, bf16_format> {};

template <>
struct element<f16_bits> : element16<f16_bits, f16_format> {};

// One element: p[i], w[i], g[i], sp[j][i] (registers of a pack, or global memory), with the
// random bits of element rindex of the optimizer's parameters.
template <class Op, typename C, typename P, typename G, typename S, bool MASTER, bool SR>
FO_HD void storage_element_at(int i, unsigned long long rindex, P* p, float* w, const G* g,
                              S* const* sp, const ieee<C>* h, ieee<C> gscale, ieee<C> clip,
                              unsigned long long seed, unsigned long long step) {
    typedef ieee<C> T;
    const int NS = Op::num_states;
    Philox4 r;
    if (SR) {
        r = random_bits4(seed, step, rindex);
    } else {
        r.v[0] = r.v[1] = r.v[2] = r.v[3] = 0u;
    }
    T pk(MASTER ? element<float>::load<C>(w[i]) : element<P>::template load<C>(p[i]));
    T s[NS > 0 ? NS : 1];
#pragma unroll
    for (int j = 0; j < NS; ++j) s[j] = T(element<S>::template load<C>(sp[j][i]));
    const T gi(element<G>::template load<C>(g[i]));
    Op::apply(pk, transformed_grad(gi, gscale, clip), s, h);
    if (MASTER) w[i] = element<float>::template store<false>(pk.v, 0u);
    p[i] = element<P>::template store<SR>(pk.v, r.v[0]);
#pragma unroll
    for (int j = 0; j < NS; ++j) sp[j][i] = element<S>::template store<SR>(s[j].v, r.v[1 + j]);
}

// Element i of the arrays (the loop body of storage_kernel; the host harness runs it too).
template <class Op, typename C, typename P, typename G, typename S, bool MASTER, bool SR>
FO_HD void storage_element(long long i, P* p, float* w, const G* g, S* const* sp,
                           const ieee<C>* h, ieee<C> gscale, ieee<C> clip,
                           unsigned long long seed, unsigned long long step,
                           unsigned long long index0) {
    const int NS = Op::num_states;
    S* const at[3] = {NS > 0 ? sp[0] + i : 0, NS > 1 ? sp[1] + i : 0, NS > 2 ? sp[2] + i : 0};
    storage_element_at<Op, C, P, G, S, MASTER, SR>(0, index0 + (unsigned long long)i, p + i,
                                                   MASTER ? w + i : w, g + i, at, h, gscale,
                                                   clip, seed, step);
}

// FO_PACK consecutive elements of one array, loaded and stored as one aligned access (8 bytes of
// 16-bit elements, 16 of float, 32 of double): a thread keeps 4x the bytes in flight of
// element-wise 2-byte loads, which is what 16-bit storage needs to approach DRAM bandwidth.
#define FO_PACK 4

template <typename E>
struct alignas(FO_PACK * sizeof(E)) pack {
    E a[FO_PACK];
};

template <typename E>
FO_HD bool pack_aligned(const E* ptr) {
    return (reinterpret_cast<unsigned long long>(ptr) % sizeof(pack<E>)) == 0ull;
}

// Whether every array the rule touches is aligned to its pack (then storage_pack serves the
// first n / FO_PACK * FO_PACK elements).
template <class Op, typename P, typename G, typename S, bool MASTER>
FO_HD bool storage_packable(const P* p, const float* w, const G* g, S* const* sp) {
    bool packed = pack_aligned(p) && pack_aligned(g) && (!MASTER || pack_aligned(w));
#pragma unroll
    for (int j = 0; j < Op::num_states; ++j) packed = packed && pack_aligned(sp[j]);
    return packed;
}

// Pack q (elements FO_PACK * q ...): one aligned load and store per array, storage_element_at
// on the registers; element k gets the random bits of index index0 + FO_PACK * q + k, as it
// would in storage_element.
template <class Op, typename C, typename P, typename G, typename S, bool MASTER, bool SR>
FO_HD void storage_pack(long long q, P* p, float* w, const G* g, S* const* sp,
                        const ieee<C>* h, ieee<C> gscale, ieee<C> clip,
                        unsigned long long seed, unsigned long long step,
                        unsigned long long index0) {
    const int NS = Op::num_states;
    pack<P> pv = reinterpret_cast<const pack<P>*>(p)[q];
    pack<float> wv;
    if (MASTER) wv = reinterpret_cast<const pack<float>*>(w)[q];
    const pack<G> gv = reinterpret_cast<const pack<G>*>(g)[q];
    pack<S> sv[3];
#pragma unroll
    for (int j = 0; j < NS; ++j) sv[j] = reinterpret_cast<const pack<S>*>(sp[j])[q];
    S* const lanes[3] = {sv[0].a, sv[1].a, sv[2].a};
    const unsigned long long first = index0 + (unsigned long long)q * FO_PACK;
#pragma unroll
    for (int k = 0; k < FO_PACK; ++k) {
        storage_element_at<Op, C, P, G, S, MASTER, SR>(k, first + k, pv.a, wv.a, gv.a, lanes, h,
                                                       gscale, clip, seed, step);
    }
    reinterpret_cast<pack<P>*>(p)[q] = pv;
    if (MASTER) reinterpret_cast<pack<float>*>(w)[q] = wv;
#pragma unroll
    for (int j = 0; j < NS; ++j) reinterpret_cast<pack<S>*>(sp[j])[q] = sv[j];
}

template <class Op, typename C, typename P, typename G, typename S, bool MASTER, bool SR>
__global__ void storage_kernel(P* __restrict__ p, float* __restrict__ w,
                               const G* __restrict__ g, S* __restrict__ s0,
                               S* __restrict__ s1, S* __restrict__ s2, long long n,
                               Scalars<C> hs, C gscale, C clip, unsigned long long seed,
                               unsigned long long step, unsigned long long index0) {
    ieee<C> h[FO_MAX_SCALARS];
#pragma unroll
    for (int k = 0; k < FO_MAX_SCALARS; ++k) h[k] = ieee<C>(hs.v[k]);
    S* sp[3] = {s0, s1, s2};
    const ieee<C> gs(gscale), cl(clip);
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (storage_packable<Op, P, G, S, MASTER>(p, w, g, sp)) {
        const long long npacks = n / FO_PACK;
        for (long long q = start; q < npacks; q += stride) {
            storage_pack<Op, C, P, G, S, MASTER, SR>(q, p, w, g, sp, h, gs, cl, seed, step,
                                                     index0);
        }
        done = npacks * FO_PACK;
    }
    for (long long i = done + start; i < n; i += stride) {
        storage_element<Op, C, P, G, S, MASTER, SR>(i, p, w, g, sp, h, gs, cl, seed, step,
                                                     index0);
    }
}

// Conversion (Backend.convert, kernels/loops.py's convert_loop): dst[i] = src[i] through the
// element policies above, one instantiation per (destination, source, stochastic rounding), e.g.
//
//   fo::convert_kernel<fo::bf16_bits, float, true>
//     (D* dst, const S* src, long long n, unsigned long long seed, unsigned long long step,
//      unsigned long long index0, int word)
//
// The value goes through double for a double source, else through float (every other source
// widens to float exactly), so a double source stored in 16 bits is rounded to float first, as
// the storage stores do. With SR (a 16-bit D) the store takes word `word` (0-3) of
// random_bits4(seed, step, index0 + i): the bits the storage kernel gives the parameter (0) or
// state slot j (1 + j) of element i.

template <typename S>
struct convert_compute {
    typedef float type;
};

template <>
struct convert_compute<double> {
    typedef double type;
};

// Word `word` (0-3) of r, by selects: an index computed at run time into r.v would put r in
// local memory.
FO_HD unsigned int random_word(const Philox4& r, int word) {
    const unsigned int lo = (word & 1) ? r.v[1] : r.v[0];
    const unsigned int hi = (word & 1) ? r.v[3] : r.v[2];
    return (word & 2) ? hi : lo;
}

// Element i (the loop body of convert_kernel, __host__ __device__ for a host harness).
template <typename D, typename S, bool SR>
FO_HD void convert_element(long long i, D* dst, const S* src, unsigned long long seed,
                           unsigned long long step, unsigned long long index0, int word) {
    typedef typename convert_compute<S>::type C;
    unsigned int rbits = 0u;
    if (SR) rbits = random_word(random_bits4(seed, step, index0 + (unsigned long long)i), word);
    dst[i] = element<D>::template store<SR>(element<S>::template load<C>(src[i]), rbits);
}

template <typename D, typename S, bool SR>
__global__ void convert_kernel(D* __restrict__ dst, const S* __restrict__ src, long long n,
                               unsigned long long seed, unsigned long long step,
                               unsigned long long index0, int word) {
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = start; i < n; i += stride) {
        convert_element<D, S, SR>(i, dst, src, seed, step, index0, word);
    }
}

}  // namespace fo

#endif  // FO_ENABLE_STORAGE
