// Segmented reductions and per-segment updates for the CuPy backend (kernels/segment_cupy.py):
// the CUDA templates of kernels/segment_loops.py in CUDA C, over the rules of
// segment_rules.cuh, in the same order as numba-cuda's kernels (kernels/segment_cuda.py).
//
// Layout (segment_loops.pieces): piece k = [lo[k], hi[k]) of segment seg[k]; segment s has
// pieces first[s] .. first[s + 1] - 1. Kernels, one per (rule, dtype), F = float | double:
//
//   fo_seg_<rule>_reduce_<f32|f64>(const F* p, const F* g, const F* s0, const F* s1,
//       fo::Scalars<F> h, F gscale, F clip, const int* flags, const long long* lo,
//       const long long* hi, const long long* seg, long long npieces, double* out)
//     launch 1, blockDim.x == FO_REDUCTION_THREADS (T), any grid: block b takes pieces b,
//     b + gridDim.x, ...; thread t sums x^2 and y^2 ((x, y) = R::pre(...), widened exactly to
//     double) over lo + t, lo + t + T, ... in index order, each product and sum one explicitly
//     rounded float64 operation (numba-cuda's dmul_rn / dadd_rn), then the block adds its T
//     sums pairwise (s[t] += s[t + half], half = T/2, ..., 1); out[2k], out[2k + 1] = the sums.
//   fo_seg_<rule>_segment_<f32|f64>(const long long* first, const double* out, const int* flags,
//       long long nseg, F* st, F* r, double* sums, fo::Scalars<double> h)
//     launch 2, one thread per segment (grid-stride): the pieces' partials added in piece order
//     from 0, then R::segment in float64; r[2s], r[2s + 1] and st[s] rounded to F.
//   fo_seg_<rule>_apply_<f32|f64>(F* p, const F* g, F* s0, F* s1, fo::Scalars<F> h, F gscale,
//       F clip, const int* flags, const long long* lo, const long long* hi,
//       const long long* seg, long long npieces, const F* r)
//     launch 3 (not for segment_norms), block b takes pieces b, b + gridDim.x, ...: R::update on
//     every element with its segment's r.
// Unused state slots are null. The result never depends on the grid.
//
// fo::seg::lane, tree_level, segment_one and apply_piece are __host__ __device__: the test
// harness (tests/segment_host_harness.cu) runs them for every thread of a block in turn.

#define FO_ENABLE_RULES 0
#include "optim_kernels.cu"
#include "segment_rules.cuh"

namespace fo {
namespace seg {

typedef ieee<double> D;

template <typename F>
FO_HD void load_scalars(const Scalars<F>& h, nv<F>* out) {
    for (int k = 0; k < FO_MAX_SCALARS; ++k) out[k] = nv<F>(h.v[k]);
}

// Thread t's share of piece [lo, hi): its two running float64 sums of squares.
template <class R, typename F>
FO_HD void lane(const F* p, const F* g, const F* s0, const F* s1, const nv<F>* h, F gscale,
                F clip, int flags, long long lo, long long hi, int t, double& rx, double& ry) {
    D ax(0.0), ay(0.0);
    for (long long i = lo + t; i < hi; i += FO_REDUCTION_THREADS) {
        const nv<F> zero(F(0));
        nv<F> x, y;
        R::pre(nv<F>(p[i]), transformed_grad(nv<F>(g[i]), nv<F>(gscale), nv<F>(clip)),
               R::pre_slots > 0 ? nv<F>(s0[i]) : zero, R::pre_slots > 1 ? nv<F>(s1[i]) : zero,
               h, flags, x, y);
        const D xv(widen(x.v)), yv(widen(y.v));
        ax = ax + xv * xv;
        ay = ay + yv * yv;
    }
    rx = ax.v;
    ry = ay.v;
}

// One level of the block's tree: s[t] += s[t + half] for t < half (sx and sy).
FO_HD void tree_level(double* sx, double* sy, int t, int half) {
    if (t < half) {
        sx[t] = (D(sx[t]) + D(sx[t + half])).v;
        sy[t] = (D(sy[t]) + D(sy[t + half])).v;
    }
}

// Launch 2 for segment s.
template <class R, typename F>
FO_HD void segment_one(long long s, const long long* first, const double* out, const int* flags,
                       F* st, F* r, double* sums, const nv<double>* h) {
    D sx(0.0), sy(0.0);
    for (long long k = first[s]; k < first[s + 1]; ++k) {
        sx = sx + D(out[2 * k]);
        sy = sy + D(out[2 * k + 1]);
    }
    nv<double> state(widen(st[s])), r0, r1;
    R::segment(nv<double>(sx.v), nv<double>(sy.v), flags[s], state, h, r0, r1);
    convert(r[2 * s], r0.v);
    convert(r[2 * s + 1], r1.v);
    convert(st[s], state.v);
    sums[2 * s] = sx.v;
    sums[2 * s + 1] = sy.v;
}

// Launch 3 for the elements lo + t0, lo + t0 + step, ... < hi of a piece of segment j.
template <class R, typename F>
FO_HD void apply_piece(F* p, const F* g, F* s0, F* s1, const nv<F>* h, F gscale, F clip,
                       int flags, long long lo, long long hi, long long t0, long long step,
                       const F* r, long long j) {
    const nv<F> r0(r[2 * j]), r1(r[2 * j + 1]), zero(F(0));
    for (long long i = lo + t0; i < hi; i += step) {
        nv<F> pv(p[i]);
        nv<F> a = R::slots > 0 ? nv<F>(s0[i]) : zero;
        nv<F> b = R::slots > 1 ? nv<F>(s1[i]) : zero;
        R::update(pv, transformed_grad(nv<F>(g[i]), nv<F>(gscale), nv<F>(clip)), a, b, h, flags,
                  r0, r1);
        p[i] = pv.v;
        if (R::slots > 0) s0[i] = a.v;
        if (R::slots > 1) s1[i] = b.v;
    }
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
template <class R, typename F>
__device__ __forceinline__ void reduce_kernel(const F* p, const F* g, const F* s0, const F* s1,
                                              const Scalars<F>& hs, F gscale, F clip,
                                              const int* flags, const long long* lo,
                                              const long long* hi, const long long* seg,
                                              long long npieces, double* out) {
    __shared__ double sx[FO_REDUCTION_THREADS];
    __shared__ double sy[FO_REDUCTION_THREADS];
    nv<F> h[FO_MAX_SCALARS];
    load_scalars(hs, h);
    const int t = threadIdx.x;
    for (long long k = blockIdx.x; k < npieces; k += gridDim.x) {
        lane<R, F>(p, g, s0, s1, h, gscale, clip, flags[seg[k]], lo[k], hi[k], t, sx[t], sy[t]);
        __syncthreads();
        for (int half = FO_REDUCTION_THREADS / 2; half > 0; half >>= 1) {
            tree_level(sx, sy, t, half);
            __syncthreads();
        }
        if (t == 0) {
            out[2 * k] = sx[0];
            out[2 * k + 1] = sy[0];
        }
        __syncthreads();  // sx and sy are reused by the next piece
    }
}

template <class R, typename F>
__device__ __forceinline__ void segment_kernel(const long long* first, const double* out,
                                               const int* flags, long long nseg, F* st, F* r,
                                               double* sums, const Scalars<double>& hs) {
    nv<double> h[FO_MAX_SCALARS];
    load_scalars(hs, h);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long s = (long long)blockIdx.x * blockDim.x + threadIdx.x; s < nseg; s += stride) {
        segment_one<R, F>(s, first, out, flags, st, r, sums, h);
    }
}

template <class R, typename F>
__device__ __forceinline__ void apply_kernel(F* p, const F* g, F* s0, F* s1,
                                             const Scalars<F>& hs, F gscale, F clip,
                                             const int* flags, const long long* lo,
                                             const long long* hi, const long long* seg,
                                             long long npieces, const F* r) {
    nv<F> h[FO_MAX_SCALARS];
    load_scalars(hs, h);
    for (long long k = blockIdx.x; k < npieces; k += gridDim.x) {
        const long long j = seg[k];
        apply_piece<R, F>(p, g, s0, s1, h, gscale, clip, flags[j], lo[k], hi[k], threadIdx.x,
                          blockDim.x, r, j);
    }
}
#endif

}  // namespace seg
}  // namespace fo

// X(name, struct): the rules with an elementwise update (every per-segment rule but
// segment_norms, which only reduces).
#define FO_SEGMENT_UPDATES(X) \
    X(lamb, Lamb)             \
    X(lars, Lars)             \
    X(novograd, Novograd)

#define FO_SEG_REDUCE(name, R, F, sfx)                                                          \
    extern "C" __global__ void fo_seg_##name##_reduce_##sfx(                                   \
        const F* p, const F* g, const F* s0, const F* s1, fo::Scalars<F> h, F gscale, F clip,  \
        const int* flags, const long long* lo, const long long* hi, const long long* seg,      \
        long long npieces, double* out) {                                                      \
        fo::seg::reduce_kernel<fo::seg::R, F>(p, g, s0, s1, h, gscale, clip, flags, lo, hi,    \
                                              seg, npieces, out);                              \
    }                                                                                          \
    extern "C" __global__ void fo_seg_##name##_segment_##sfx(                                  \
        const long long* first, const double* out, const int* flags, long long nseg, F* st,    \
        F* r, double* sums, fo::Scalars<double> h) {                                           \
        fo::seg::segment_kernel<fo::seg::R, F>(first, out, flags, nseg, st, r, sums, h);       \
    }
#define FO_SEG_APPLY(name, R, F, sfx)                                                           \
    extern "C" __global__ void fo_seg_##name##_apply_##sfx(                                    \
        F* p, const F* g, F* s0, F* s1, fo::Scalars<F> h, F gscale, F clip, const int* flags,  \
        const long long* lo, const long long* hi, const long long* seg, long long npieces,      \
        const F* r) {                                                                          \
        fo::seg::apply_kernel<fo::seg::R, F>(p, g, s0, s1, h, gscale, clip, flags, lo, hi,     \
                                             seg, npieces, r);                                 \
    }
#define FO_SEG_REDUCES(name, R) FO_SEG_REDUCE(name, R, float, f32) FO_SEG_REDUCE(name, R, double, f64)
#define FO_SEG_APPLIES(name, R) FO_SEG_APPLY(name, R, float, f32) FO_SEG_APPLY(name, R, double, f64)

// FO_ENABLE_SEGMENT_KERNELS 0 leaves the kernels out (the host harness needs the functions only).
#ifndef FO_ENABLE_SEGMENT_KERNELS
#define FO_ENABLE_SEGMENT_KERNELS 1
#endif
#if FO_ENABLE_SEGMENT_KERNELS
FO_SEGMENT_RULES(FO_SEG_REDUCES)
FO_SEGMENT_UPDATES(FO_SEG_APPLIES)
#endif

#undef FO_SEG_REDUCES
#undef FO_SEG_APPLIES
#undef FO_SEG_REDUCE
#undef FO_SEG_APPLY
