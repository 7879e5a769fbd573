// Adafactor's five phases for the CuPy backend (kernels/factored_cupy.py): the loops of
// kernels/factored.py in CUDA C, one launch per phase whatever the number of tensors, every
// operation rounded where the numba-cpu kernel rounds it, so both give the same bits.
//
// Tables (factored.plan, copied to the device): items (ITEM_FIELDS int64 per tile or vector
// piece), batches (BATCH_FIELDS per matrix), first (segment s's items: first[s] .. first[s+1]-1),
// numel (elements per segment). F = float | double; sfx = f32 | f64.
//
//   fo_af_tiles_<sfx>(const F* g, F gscale, F clip, const long long* items, long long nitems,
//       double* rowpart, double* colpart)
//     phase 0, blockDim.x == FO_AF_TILE_COLS, any grid (block b takes items b, b + gridDim.x,
//     ...; vector pieces are skipped): thread j = column j. Per tile row, the squares of the
//     transformed gradient (widened to double) go to shared memory, zero past the tile's
//     columns, and are added by pairwise halving over pow2(cols) lanes (t[j] += t[j + half],
//     a __syncthreads per level: factored._tree); thread j adds its column's squares row by
//     row in a register.
//   fo_af_factors_<sfx>(const long long* batches, long long nbatches, const double* rowpart,
//       const double* colpart, F* row_var, F* col_var, F* bmean, fo::Scalars<F> h)
//     phase 1, any block size and grid: block b takes matrices b, b + gridDim.x, ...; its
//     threads lerp the rows, then thread 0 adds the new row factors in row order (the mean,
//     bmean) while the threads lerp the columns.
//   fo_af_items_<sfx>(const F* p, const F* g, fo::Scalars<F> h, F gscale, F clip,
//       const long long* items, long long nitems, const F* row_var, const F* col_var,
//       const F* bmean, F* variance, F* update, double* part)
//     phase 2, blockDim.x == FO_AF_TILE_COLS, any grid: lane j = column j of a tile (elements
//     j, j + TILE_COLS, ... of a vector piece): the unscaled update u into update (a vector's
//     lerped variance stored too), p^2 and u^2 summed in lane order, then the same tree over
//     pow2(cols) lanes (TILE_COLS for a piece); part[2k], part[2k + 1] = item k's sums.
//   fo_af_scales_<sfx>(const long long* first, const long long* numel, long long nseg,
//       const double* part, fo::Scalars<double> h64, F* scale)
//     phase 3, one thread per segment (grid-stride): its items' sums added in item order, then
//     scale = -max(eps2, RMS(p)) rho / max(1, RMS(u) / d) in double, rounded to F.
//   fo_af_apply_<sfx>(F* p, fo::Scalars<F> h, const long long* items, long long nitems,
//       const F* update, const F* scale)
//     phase 4, any block size and grid: p = p * decay + scale * u over every item.
//
// Rounding: the numba-cpu kernel fuses nothing (LLVM without fast-math contracts no multiply
// and add) and flushes nothing, so every operation here is fo::ieee<F> / ieee<double>
// (rules.cuh: one explicitly rounded PTX instruction each, never contracted into an fma, no
// .ftz under CuPy's -ftz=true), conversions are fo::widen / fo::narrow (exact cvt / cvt.rn).
// Python's max(a, b) as numba compiles it is `b > a ? b : a` (a NaN b gives a).
//
// The phase bodies are __host__ __device__ functions of one thread (or one level of a tree):
// the test harness (tests/factored_host_harness.cu) runs them for every thread in turn.

#define FO_ENABLE_RULES 0
#include "optim_kernels.cu"

// Columns of the item and batch tables and the tile width (kernels/factored.py; the tests
// check them against it).
#define FO_AF_KIND 0
#define FO_AF_SEG 1
#define FO_AF_LO 2
#define FO_AF_ROWS 3
#define FO_AF_COLS 4
#define FO_AF_LD 5
#define FO_AF_RV 6
#define FO_AF_CV 7
#define FO_AF_BATCH 8
#define FO_AF_RP 9
#define FO_AF_CP 10
#define FO_AF_NCB 11
#define FO_AF_NRB 12
#define FO_AF_VO 13
#define FO_AF_ITEM_FIELDS 14
#define FO_AF_B_RV 0
#define FO_AF_B_M 1
#define FO_AF_B_CV 2
#define FO_AF_B_N 3
#define FO_AF_B_RP 4
#define FO_AF_B_CP 5
#define FO_AF_B_NCB 6
#define FO_AF_B_NRB 7
#define FO_AF_BATCH_FIELDS 8
#define FO_AF_TILE_COLS 256
// The element scalars h (factored.H_FIELDS) and the segment scalars h64 (H64_FIELDS).
#define FO_AF_GSIGN 0
#define FO_AF_W 1
#define FO_AF_ONE_MINUS_W 2
#define FO_AF_EPS1 3
#define FO_AF_EPS1_SQ 4
#define FO_AF_DECAY 5
#define FO_AF_ONE 6
#define FO_AF_H_FIELDS 7
#define FO_AF_EPS2 0
#define FO_AF_RHO 1
#define FO_AF_D 2

namespace fo {
namespace af {

typedef ieee<double> D;

template <typename F>
FO_HD void load_scalars(const Scalars<F>& hs, ieee<F>* h) {
    for (int k = 0; k < FO_AF_H_FIELDS; ++k) h[k] = ieee<F>(hs.v[k]);
}

FO_HD int pow2(long long n) {
    int m = 1;
    while (m < n) m *= 2;
    return m;
}

// factored._grad: g * gscale clipped to [-clip, clip] (clip = inf for none; NaN stays NaN).
template <typename F>
FO_HD ieee<F> grad(F g, ieee<F> gscale, ieee<F> clip) {
    ieee<F> x = ieee<F>(g) * gscale;
    const ieee<F> lo = -clip;
    x = x < lo ? lo : x;
    return x > clip ? clip : x;
}

// factored._update: rsqrt(clamp_min(v, eps1^2)) * (gsign * g) as (1 / sqrt(v)) * (gsign * g).
template <typename F>
FO_HD ieee<F> unscaled(ieee<F> g, ieee<F> v, const ieee<F>* h) {
    v = v < h[FO_AF_EPS1_SQ] ? h[FO_AF_EPS1_SQ] : v;
    return (h[FO_AF_ONE] / fo_sqrt(v)) * (h[FO_AF_GSIGN] * g);
}

template <typename F>
FO_HD F to(double x) {
    F r;
    convert(r, x);
    return r;
}

FO_HD D square(double x) { return D(x) * D(x); }

// Python's max(a, b) as numba compiles it: b if b > a, else a.
FO_HD D pymax(D a, D b) { return b > a ? b : a; }

// One level of a tree over s (and u): s[j] += s[j + half] for j < half.
FO_HD void tree_level(double* s, double* u, int j, int half) {
    if (j < half) {
        s[j] = (D(s[j]) + D(s[j + half])).v;
        if (u) u[j] = (D(u[j]) + D(u[j + half])).v;
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 0: thread j's share of row i of tile `it`: t[j] = x^2 (0 past the tile's columns),
// col += x^2 (x the transformed gradient in double).
template <typename F>
FO_HD void tile_lane(const F* g, ieee<F> gscale, ieee<F> clip, const long long* it, long long i,
                     int j, double* t, double& col) {
    double sq = 0.0;
    if (j < it[FO_AF_COLS]) {
        sq = square(widen(grad(g[it[FO_AF_LO] + i * it[FO_AF_LD] + j], gscale, clip).v)).v;
        col = (D(col) + D(sq)).v;
    }
    t[j] = sq;
}

// ---------------------------------------------------------------------------------------------
// Phase 1 (factored._factor_update), matrix q: row i, then the mean (one thread), column j.

// A row or column factor v lerped toward its mean: its n partial sums at part, added in
// order, over count elements.
template <typename F>
FO_HD void lerp_factor(const double* part, long long n, long long count, F& v, const ieee<F>* h) {
    D s(0.0);
    for (long long c = 0; c < n; ++c) s = s + D(part[c]);
    const F mean = to<F>((s / D((double)count)).v);
    v = lerp(ieee<F>(v), ieee<F>(mean), h[FO_AF_W], h[FO_AF_ONE_MINUS_W]).v;
}

template <typename F>
FO_HD void factor_row(const long long* b, long long i, const double* rowpart, F* row_var,
                      const ieee<F>* h) {
    const long long ncb = b[FO_AF_B_NCB];
    lerp_factor(rowpart + b[FO_AF_B_RP] + i * ncb, ncb, b[FO_AF_B_N], row_var[b[FO_AF_B_RV] + i],
                h);
}

template <typename F>
FO_HD void factor_mean(const long long* b, long long q, const F* row_var, F* bmean,
                       const ieee<F>* h) {
    const long long m = b[FO_AF_B_M];
    D acc(0.0);
    for (long long i = 0; i < m; ++i) acc = acc + D(widen(row_var[b[FO_AF_B_RV] + i]));
    const ieee<F> mean(to<F>((acc / D((double)m)).v));
    bmean[q] = (h[FO_AF_EPS1] <= mean || mean != mean) ? mean.v : h[FO_AF_EPS1].v;
}

template <typename F>
FO_HD void factor_col(const long long* b, long long j, const double* colpart, F* col_var,
                      const ieee<F>* h) {
    const long long nrb = b[FO_AF_B_NRB];
    lerp_factor(colpart + b[FO_AF_B_CP] + j * nrb, nrb, b[FO_AF_B_M], col_var[b[FO_AF_B_CV] + j],
                h);
}

// ---------------------------------------------------------------------------------------------
// Phase 2 (factored._item_sums): lane j of item `it`, its two float64 sums of squares.
template <typename F>
FO_HD void item_lane(const F* p, const F* g, const ieee<F>* h, ieee<F> gscale, ieee<F> clip,
                     const long long* it, int j, const F* row_var, const F* col_var,
                     const F* bmean, F* variance, F* update, double& sp, double& su) {
    const long long lo = it[FO_AF_LO], cols = it[FO_AF_COLS];
    D ap(0.0), au(0.0);
    if (it[FO_AF_KIND] == 1) {
        if (j < cols) {
            const ieee<F> c(col_var[it[FO_AF_CV] + j]), bm(bmean[it[FO_AF_BATCH]]);
            for (long long i = 0; i < it[FO_AF_ROWS]; ++i) {
                const long long e = lo + i * it[FO_AF_LD] + j;
                const ieee<F> r(row_var[it[FO_AF_RV] + i]);
                const ieee<F> u = unscaled(grad(g[e], gscale, clip), r * c / bm, h);
                update[e] = u.v;
                ap = ap + square(widen(p[e]));
                au = au + square(widen(u.v));
            }
        }
    } else {
        for (long long k = j; k < cols; k += FO_AF_TILE_COLS) {
            const long long e = lo + k, o = it[FO_AF_VO] + k;
            const ieee<F> gk = grad(g[e], gscale, clip);
            const ieee<F> v =
                lerp(ieee<F>(variance[o]), gk * gk, h[FO_AF_W], h[FO_AF_ONE_MINUS_W]);
            variance[o] = v.v;
            const ieee<F> u = unscaled(gk, v, h);
            update[e] = u.v;
            ap = ap + square(widen(p[e]));
            au = au + square(widen(u.v));
        }
    }
    sp = ap.v;
    su = au.v;
}

// The lanes of item `it`'s tree: pow2(cols) for a tile, TILE_COLS for a vector piece.
FO_HD int item_lanes(const long long* it) {
    return it[FO_AF_KIND] == 1 ? pow2(it[FO_AF_COLS]) : FO_AF_TILE_COLS;
}

// ---------------------------------------------------------------------------------------------
// Phase 3 (factored._segment_scale), segment s.
template <typename F>
FO_HD void segment_scale(long long s, const long long* first, const long long* numel,
                         const double* part, const double* h64, F* scale) {
    D sp(0.0), su(0.0);
    for (long long k = first[s]; k < first[s + 1]; ++k) {
        sp = sp + D(part[2 * k]);
        su = su + D(part[2 * k + 1]);
    }
    const long long n = numel[s];
    if (n == 0) {
        scale[s] = F(0);
        return;
    }
    const D root = fo_sqrt(D((double)n));
    const D alpha = pymax(D(h64[FO_AF_EPS2]), fo_sqrt(sp) / root) * D(h64[FO_AF_RHO]);
    const D den = pymax(D(1.0), fo_sqrt(su) / (root * D(h64[FO_AF_D])));
    scale[s] = to<F>((-alpha / den).v);
}

// ---------------------------------------------------------------------------------------------
// Phase 4 (factored._item_apply): columns j0, j0 + step, ... of every row of item `it`.
template <typename F>
FO_HD void apply_lane(F* p, const ieee<F>* h, const long long* it, long long j0, long long step,
                      const F* update, const F* scale) {
    const ieee<F> a(scale[it[FO_AF_SEG]]), decay = h[FO_AF_DECAY];
    for (long long i = 0; i < it[FO_AF_ROWS]; ++i) {
        const long long e = it[FO_AF_LO] + i * it[FO_AF_LD];
        for (long long j = j0; j < it[FO_AF_COLS]; j += step) {
            p[e + j] = (ieee<F>(p[e + j]) * decay + a * ieee<F>(update[e + j])).v;
        }
    }
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// factored._tree over the block's lanes s[:n] (and u[:n]; n a power of two), thread j taking
// lane j: a barrier before each level and after the last, so s[0] (u[0]) is the sum for all.
__device__ __forceinline__ void block_tree(double* s, double* u, int j, int n) {
    __syncthreads();
    for (int half = n / 2; half > 0; half >>= 1) {
        tree_level(s, u, j, half);
        __syncthreads();
    }
}

template <typename F>
__device__ __forceinline__ void tiles_kernel(const F* __restrict__ g, F gscale, F clip,
                                             const long long* __restrict__ items,
                                             long long nitems, double* __restrict__ rowpart,
                                             double* __restrict__ colpart) {
    __shared__ double t[FO_AF_TILE_COLS];
    const int j = threadIdx.x;
    for (long long k = blockIdx.x; k < nitems; k += gridDim.x) {
        const long long* it = items + k * FO_AF_ITEM_FIELDS;
        if (it[FO_AF_KIND] != 1) continue;  // the same for every thread of the block
        const int n = pow2(it[FO_AF_COLS]);
        double col = 0.0;
        for (long long i = 0; i < it[FO_AF_ROWS]; ++i) {
            tile_lane(g, ieee<F>(gscale), ieee<F>(clip), it, i, j, t, col);
            block_tree(t, (double*)0, j, n);
            if (j == 0) rowpart[it[FO_AF_RP] + i * it[FO_AF_NCB]] = t[0];
            // the next row's t[j] (j > 0) is written after this barrier-ended level; t[0] by
            // thread 0 itself after reading it
        }
        if (j < it[FO_AF_COLS]) colpart[it[FO_AF_CP] + j * it[FO_AF_NRB]] = col;
        __syncthreads();  // t[0] is read above before another item's rows overwrite t
    }
}

template <typename F>
__device__ __forceinline__ void factors_kernel(const long long* __restrict__ batches,
                                               long long nbatches,
                                               const double* __restrict__ rowpart,
                                               const double* __restrict__ colpart,
                                               F* __restrict__ row_var, F* __restrict__ col_var,
                                               F* __restrict__ bmean, const Scalars<F>& hs) {
    ieee<F> h[FO_AF_H_FIELDS];
    load_scalars(hs, h);
    const int t = threadIdx.x;
    for (long long q = blockIdx.x; q < nbatches; q += gridDim.x) {
        const long long* b = batches + q * FO_AF_BATCH_FIELDS;
        for (long long i = t; i < b[FO_AF_B_M]; i += blockDim.x) {
            factor_row(b, i, rowpart, row_var, h);
        }
        __syncthreads();  // every new row factor written before thread 0 adds them
        if (t == 0) factor_mean(b, q, row_var, bmean, h);
        for (long long j = t; j < b[FO_AF_B_N]; j += blockDim.x) {
            factor_col(b, j, colpart, col_var, h);
        }
    }
}

template <typename F>
__device__ __forceinline__ void items_kernel(
    const F* __restrict__ p, const F* __restrict__ g, const Scalars<F>& hs, F gscale, F clip,
    const long long* __restrict__ items, long long nitems, const F* __restrict__ row_var,
    const F* __restrict__ col_var, const F* __restrict__ bmean, F* __restrict__ variance,
    F* __restrict__ update, double* __restrict__ part) {
    __shared__ double sp[FO_AF_TILE_COLS];
    __shared__ double su[FO_AF_TILE_COLS];
    ieee<F> h[FO_AF_H_FIELDS];
    load_scalars(hs, h);
    const int j = threadIdx.x;
    for (long long k = blockIdx.x; k < nitems; k += gridDim.x) {
        const long long* it = items + k * FO_AF_ITEM_FIELDS;
        item_lane(p, g, h, ieee<F>(gscale), ieee<F>(clip), it, j, row_var, col_var, bmean,
                  variance, update, sp[j], su[j]);
        block_tree(sp, su, j, item_lanes(it));
        if (j == 0) {
            part[2 * k] = sp[0];
            part[2 * k + 1] = su[0];
        }
        __syncthreads();  // sp and su are reused by the next item
    }
}

template <typename F>
__device__ __forceinline__ void scales_kernel(const long long* __restrict__ first,
                                              const long long* __restrict__ numel, long long nseg,
                                              const double* __restrict__ part,
                                              const Scalars<double>& h64, F* __restrict__ scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long s = (long long)blockIdx.x * blockDim.x + threadIdx.x; s < nseg; s += stride) {
        segment_scale(s, first, numel, part, h64.v, scale);
    }
}

template <typename F>
__device__ __forceinline__ void apply_kernel(F* __restrict__ p, const Scalars<F>& hs,
                                             const long long* __restrict__ items,
                                             long long nitems, const F* __restrict__ update,
                                             const F* __restrict__ scale) {
    ieee<F> h[FO_AF_H_FIELDS];
    load_scalars(hs, h);
    for (long long k = blockIdx.x; k < nitems; k += gridDim.x) {
        apply_lane(p, h, items + k * FO_AF_ITEM_FIELDS, threadIdx.x, blockDim.x, update, scale);
    }
}
#endif

}  // namespace af
}  // namespace fo

#define FO_AF_KERNELS(F, sfx)                                                                   \
    extern "C" __global__ void fo_af_tiles_##sfx(const F* g, F gscale, F clip,                  \
                                                 const long long* items, long long nitems,      \
                                                 double* rowpart, double* colpart) {            \
        fo::af::tiles_kernel<F>(g, gscale, clip, items, nitems, rowpart, colpart);             \
    }                                                                                          \
    extern "C" __global__ void fo_af_factors_##sfx(                                            \
        const long long* batches, long long nbatches, const double* rowpart,                   \
        const double* colpart, F* row_var, F* col_var, F* bmean, fo::Scalars<F> h) {           \
        fo::af::factors_kernel<F>(batches, nbatches, rowpart, colpart, row_var, col_var, bmean, \
                                  h);                                                          \
    }                                                                                          \
    extern "C" __global__ void fo_af_items_##sfx(                                              \
        const F* p, const F* g, fo::Scalars<F> h, F gscale, F clip, const long long* items,    \
        long long nitems, const F* row_var, const F* col_var, const F* bmean, F* variance,     \
        F* update, double* part) {                                                             \
        fo::af::items_kernel<F>(p, g, h, gscale, clip, items, nitems, row_var, col_var, bmean, \
                                variance, update, part);                                       \
    }                                                                                          \
    extern "C" __global__ void fo_af_scales_##sfx(const long long* first,                      \
                                                  const long long* numel, long long nseg,      \
                                                  const double* part,                          \
                                                  fo::Scalars<double> h64, F* scale) {         \
        fo::af::scales_kernel<F>(first, numel, nseg, part, h64, scale);                        \
    }                                                                                          \
    extern "C" __global__ void fo_af_apply_##sfx(F* p, fo::Scalars<F> h,                       \
                                                 const long long* items, long long nitems,      \
                                                 const F* update, const F* scale) {             \
        fo::af::apply_kernel<F>(p, h, items, nitems, update, scale);                           \
    }

// FO_ENABLE_FACTORED_KERNELS 0 leaves the kernels out (the host harness needs the functions).
#ifndef FO_ENABLE_FACTORED_KERNELS
#define FO_ENABLE_FACTORED_KERNELS 1
#endif
#if FO_ENABLE_FACTORED_KERNELS
FO_AF_KERNELS(float, f32)
FO_AF_KERNELS(double, f64)
#endif
#undef FO_AF_KERNELS
