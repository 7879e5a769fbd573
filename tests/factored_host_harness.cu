// Host harness for kernels/factored_kernels.cu (tests/test_adafactor_cupy.py): Adafactor's five
// launches run on host arrays with the kernels' own __host__ __device__ functions, the blocks
// and threads emulated in order (every thread of a block up to a barrier, then the next stage):
//   tiles    per tile, per row: tile_lane for threads 0..TILE_COLS-1, each tree level for every
//            thread in turn, then thread 0's row sum; the column sums at the end;
//   factors  per matrix: factor_row for every row, factor_mean, factor_col for every column;
//   items    per item: item_lane for every lane, then the tree levels;
//   scales   segment_scale per segment;  apply  apply_lane over the whole item.
// Built once by nvcc (-ffp-contract=off) as a shared library, loaded with ctypes; the CuPy
// launcher's launches are routed here through a fake CuPy. On the host fo::ieee<F> is plain C
// arithmetic, rounded once per operation: the numba-cpu kernel's arithmetic.

#include <cstring>

#define FO_ENABLE_FACTORED_KERNELS 0  // the functions only: no device code to build
#include "factored_kernels.cu"

namespace {

const int T = FO_AF_TILE_COLS;
using fo::ieee;
namespace af = fo::af;

template <typename F>
void load(const void* h, ieee<F>* out) {
    af::load_scalars(*static_cast<const fo::Scalars<F>*>(h), out);
}

template <typename F>
void tiles(const void* g, double gscale, double clip, const long long* items, long long nitems,
           double* rowpart, double* colpart) {
    double t[T], col[T];
    for (long long k = 0; k < nitems; ++k) {
        const long long* it = items + k * FO_AF_ITEM_FIELDS;
        if (it[FO_AF_KIND] != 1) continue;
        const int n = af::pow2(it[FO_AF_COLS]);
        for (int j = 0; j < T; ++j) col[j] = 0.0;
        for (long long i = 0; i < it[FO_AF_ROWS]; ++i) {
            for (int j = 0; j < T; ++j) {
                af::tile_lane(static_cast<const F*>(g), ieee<F>(F(gscale)), ieee<F>(F(clip)), it,
                              i, j, t, col[j]);
            }
            for (int half = n / 2; half > 0; half >>= 1) {
                for (int j = 0; j < T; ++j) af::tree_level(t, nullptr, j, half);
            }
            rowpart[it[FO_AF_RP] + i * it[FO_AF_NCB]] = t[0];
        }
        for (int j = 0; j < it[FO_AF_COLS]; ++j) colpart[it[FO_AF_CP] + j * it[FO_AF_NRB]] = col[j];
    }
}

template <typename F>
void factors(const long long* batches, long long nbatches, const double* rowpart,
             const double* colpart, void* row_var, void* col_var, void* bmean, const void* hs) {
    ieee<F> h[FO_AF_H_FIELDS];
    load<F>(hs, h);
    F *rv = static_cast<F*>(row_var), *cv = static_cast<F*>(col_var);
    for (long long q = 0; q < nbatches; ++q) {
        const long long* b = batches + q * FO_AF_BATCH_FIELDS;
        for (long long i = 0; i < b[FO_AF_B_M]; ++i) af::factor_row(b, i, rowpart, rv, h);
        af::factor_mean(b, q, rv, static_cast<F*>(bmean), h);
        for (long long j = 0; j < b[FO_AF_B_N]; ++j) af::factor_col(b, j, colpart, cv, h);
    }
}

template <typename F>
void items_(const void* p, const void* g, const void* hs, double gscale, double clip,
            const long long* items, long long nitems, const void* row_var, const void* col_var,
            const void* bmean, void* variance, void* update, double* part) {
    ieee<F> h[FO_AF_H_FIELDS];
    load<F>(hs, h);
    double sp[T], su[T];
    for (long long k = 0; k < nitems; ++k) {
        const long long* it = items + k * FO_AF_ITEM_FIELDS;
        for (int j = 0; j < T; ++j) {
            af::item_lane(static_cast<const F*>(p), static_cast<const F*>(g), h,
                          ieee<F>(F(gscale)), ieee<F>(F(clip)), it, j,
                          static_cast<const F*>(row_var), static_cast<const F*>(col_var),
                          static_cast<const F*>(bmean), static_cast<F*>(variance),
                          static_cast<F*>(update), sp[j], su[j]);
        }
        for (int half = af::item_lanes(it) / 2; half > 0; half >>= 1) {
            for (int j = 0; j < T; ++j) af::tree_level(sp, su, j, half);
        }
        part[2 * k] = sp[0];
        part[2 * k + 1] = su[0];
    }
}

template <typename F>
void scales(const long long* first, const long long* numel, long long nseg, const double* part,
            const double* h64, void* scale) {
    for (long long s = 0; s < nseg; ++s) {
        af::segment_scale(s, first, numel, part, h64, static_cast<F*>(scale));
    }
}

template <typename F>
void apply(void* p, const void* hs, const long long* items, long long nitems, const void* update,
           const void* scale) {
    ieee<F> h[FO_AF_H_FIELDS];
    load<F>(hs, h);
    for (long long k = 0; k < nitems; ++k) {
        af::apply_lane(static_cast<F*>(p), h, items + k * FO_AF_ITEM_FIELDS, 0, 1,
                       static_cast<const F*>(update), static_cast<const F*>(scale));
    }
}

}  // namespace

// One launch each, over float (double_ == 0) or double arrays, as the kernel of that phase
// would run it; h (h64) points to the scalar struct's values.

extern "C" void fo_host_af_tiles(int double_, const void* g, double gscale, double clip,
                                 const long long* items, long long nitems, double* rowpart,
                                 double* colpart) {
    (double_ ? tiles<double> : tiles<float>)(g, gscale, clip, items, nitems, rowpart, colpart);
}

extern "C" void fo_host_af_factors(int double_, const long long* batches, long long nbatches,
                                   const double* rowpart, const double* colpart, void* row_var,
                                   void* col_var, void* bmean, const void* h) {
    (double_ ? factors<double> : factors<float>)(batches, nbatches, rowpart, colpart, row_var,
                                                 col_var, bmean, h);
}

extern "C" void fo_host_af_items(int double_, const void* p, const void* g, const void* h,
                                 double gscale, double clip, const long long* items,
                                 long long nitems, const void* row_var, const void* col_var,
                                 const void* bmean, void* variance, void* update, double* part) {
    (double_ ? items_<double> : items_<float>)(p, g, h, gscale, clip, items, nitems, row_var,
                                               col_var, bmean, variance, update, part);
}

extern "C" void fo_host_af_scales(int double_, const long long* first, const long long* numel,
                                  long long nseg, const double* part, const double* h64,
                                  void* scale) {
    (double_ ? scales<double> : scales<float>)(first, numel, nseg, part, h64, scale);
}

extern "C" void fo_host_af_apply(int double_, void* p, const void* h, const long long* items,
                                 long long nitems, const void* update, const void* scale) {
    (double_ ? apply<double> : apply<float>)(p, h, items, nitems, update, scale);
}

// The table columns, the tile width and the scalar indices the kernels were built with.
extern "C" long long fo_host_af_constant(const char* name) {
#define FO_AF_NAMED(X) \
    if (std::strcmp(name, #X) == 0) return FO_AF_##X;
    FO_AF_NAMED(KIND) FO_AF_NAMED(SEG) FO_AF_NAMED(LO) FO_AF_NAMED(ROWS) FO_AF_NAMED(COLS)
    FO_AF_NAMED(LD) FO_AF_NAMED(RV) FO_AF_NAMED(CV) FO_AF_NAMED(BATCH) FO_AF_NAMED(RP)
    FO_AF_NAMED(CP) FO_AF_NAMED(NCB) FO_AF_NAMED(NRB) FO_AF_NAMED(VO) FO_AF_NAMED(ITEM_FIELDS)
    FO_AF_NAMED(B_RV) FO_AF_NAMED(B_M) FO_AF_NAMED(B_CV) FO_AF_NAMED(B_N) FO_AF_NAMED(B_RP)
    FO_AF_NAMED(B_CP) FO_AF_NAMED(B_NCB) FO_AF_NAMED(B_NRB) FO_AF_NAMED(BATCH_FIELDS)
    FO_AF_NAMED(TILE_COLS) FO_AF_NAMED(H_FIELDS) FO_AF_NAMED(GSIGN) FO_AF_NAMED(W)
    FO_AF_NAMED(ONE_MINUS_W) FO_AF_NAMED(EPS1) FO_AF_NAMED(EPS1_SQ) FO_AF_NAMED(DECAY)
    FO_AF_NAMED(ONE) FO_AF_NAMED(EPS2) FO_AF_NAMED(RHO) FO_AF_NAMED(D)
#undef FO_AF_NAMED
    return -1;
}
