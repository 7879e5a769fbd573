// Host harness for kernels/segment_kernels.cu (tests/test_segments_cupy.py): the three segment
// launches run on host arrays with the kernels' own __host__ __device__ functions, the blocks
// and threads emulated in order: per piece, fo::seg::lane for threads 0..T-1, then each tree
// level for every thread in turn (a __syncthreads between levels); per segment, segment_one;
// per piece, apply_piece over all its elements. Built once by nvcc as a shared library and
// loaded with ctypes; the CuPy launcher's launches are routed here through a fake CuPy.
// On the host the rules round every operation separately (nv<F>, segment_rules.cuh): the
// numba-cpu kernels' arithmetic, which the test compares bit for bit.

#include <cstring>

#define FO_ENABLE_SEGMENT_KERNELS 0  // no device code to build: the functions run on the host
#include "segment_kernels.cu"

namespace {

const int T = FO_REDUCTION_THREADS;
using fo::seg::nv;

template <class R, typename F>
void host_reduce(const void* p, const void* g, const void* s0, const void* s1, const void* h,
                 double gscale, double clip, const int* flags, const long long* lo,
                 const long long* hi, const long long* seg, long long npieces, double* out) {
    nv<F> hv[FO_MAX_SCALARS];
    fo::seg::load_scalars(*static_cast<const fo::Scalars<F>*>(h), hv);
    double sx[T], sy[T];
    for (long long k = 0; k < npieces; ++k) {
        for (int t = 0; t < T; ++t) {
            fo::seg::lane<R, F>(static_cast<const F*>(p), static_cast<const F*>(g),
                                static_cast<const F*>(s0), static_cast<const F*>(s1), hv,
                                F(gscale), F(clip), flags[seg[k]], lo[k], hi[k], t, sx[t], sy[t]);
        }
        for (int half = T / 2; half > 0; half >>= 1) {
            for (int t = 0; t < T; ++t) fo::seg::tree_level(sx, sy, t, half);
        }
        out[2 * k] = sx[0];
        out[2 * k + 1] = sy[0];
    }
}

template <class R, typename F>
void host_segment(const long long* first, const double* out, const int* flags, long long nseg,
                  void* st, void* r, double* sums, const double* h) {
    nv<double> hv[FO_MAX_SCALARS];
    fo::seg::load_scalars(*reinterpret_cast<const fo::Scalars<double>*>(h), hv);
    for (long long s = 0; s < nseg; ++s) {
        fo::seg::segment_one<R, F>(s, first, out, flags, static_cast<F*>(st), static_cast<F*>(r),
                                   sums, hv);
    }
}

template <class R, typename F>
void host_apply(void* p, const void* g, void* s0, void* s1, const void* h, double gscale,
                double clip, const int* flags, const long long* lo, const long long* hi,
                const long long* seg, long long npieces, const void* r) {
    nv<F> hv[FO_MAX_SCALARS];
    fo::seg::load_scalars(*static_cast<const fo::Scalars<F>*>(h), hv);
    for (long long k = 0; k < npieces; ++k) {
        fo::seg::apply_piece<R, F>(static_cast<F*>(p), static_cast<const F*>(g),
                                   static_cast<F*>(s0), static_cast<F*>(s1), hv, F(gscale),
                                   F(clip), flags[seg[k]], lo[k], hi[k], 0, 1,
                                   static_cast<const F*>(r), seg[k]);
    }
}

}  // namespace

// Each runs one launch of rule `name` (an FO_SEGMENT_RULES name) over float (double_ == 0) or
// double arrays, as the kernel of that name would; h points to the scalar struct's values.
// They return -1 for an unknown name.

#define FO_HOST_DISPATCH(CALL)                                              \
    if (double_) {                                                          \
        FO_SEGMENT_RULES(CALL##_D)                                          \
    } else {                                                                \
        FO_SEGMENT_RULES(CALL##_F)                                          \
    }                                                                       \
    return -1;

extern "C" int fo_host_seg_reduce(const char* name, int double_, const void* p, const void* g,
                                  const void* s0, const void* s1, const void* h, double gscale,
                                  double clip, const int* flags, const long long* lo,
                                  const long long* hi, const long long* seg, long long npieces,
                                  double* out) {
#define FO_REDUCE_CASE(rule, R, F)                                                           \
    if (std::strcmp(name, #rule) == 0) {                                                     \
        host_reduce<fo::seg::R, F>(p, g, s0, s1, h, gscale, clip, flags, lo, hi, seg, npieces, \
                                   out);                                                     \
        return 0;                                                                            \
    }
#define FO_REDUCE_CASE_F(rule, R) FO_REDUCE_CASE(rule, R, float)
#define FO_REDUCE_CASE_D(rule, R) FO_REDUCE_CASE(rule, R, double)
    FO_HOST_DISPATCH(FO_REDUCE_CASE)
}

extern "C" int fo_host_seg_segment(const char* name, int double_, const long long* first,
                                   const double* out, const int* flags, long long nseg, void* st,
                                   void* r, double* sums, const double* h) {
#define FO_SEGMENT_CASE(rule, R, F)                                                    \
    if (std::strcmp(name, #rule) == 0) {                                               \
        host_segment<fo::seg::R, F>(first, out, flags, nseg, st, r, sums, h);           \
        return 0;                                                                      \
    }
#define FO_SEGMENT_CASE_F(rule, R) FO_SEGMENT_CASE(rule, R, float)
#define FO_SEGMENT_CASE_D(rule, R) FO_SEGMENT_CASE(rule, R, double)
    FO_HOST_DISPATCH(FO_SEGMENT_CASE)
}

extern "C" int fo_host_seg_apply(const char* name, int double_, void* p, const void* g, void* s0,
                                 void* s1, const void* h, double gscale, double clip,
                                 const int* flags, const long long* lo, const long long* hi,
                                 const long long* seg, long long npieces, const void* r) {
#define FO_APPLY_CASE(rule, R, F)                                                             \
    if (std::strcmp(name, #rule) == 0) {                                                      \
        host_apply<fo::seg::R, F>(p, g, s0, s1, h, gscale, clip, flags, lo, hi, seg, npieces, \
                                  r);                                                         \
        return 0;                                                                             \
    }
#define FO_APPLY_CASE_F(rule, R) FO_APPLY_CASE(rule, R, float)
#define FO_APPLY_CASE_D(rule, R) FO_APPLY_CASE(rule, R, double)
    FO_HOST_DISPATCH(FO_APPLY_CASE)
}

// The flag bits and the block size the kernels were built with.
extern "C" int fo_host_seg_constant(const char* name) {
    if (std::strcmp(name, "decay") == 0) return FO_FLAG_DECAY;
    if (std::strcmp(name, "trust") == 0) return FO_FLAG_TRUST;
    if (std::strcmp(name, "threads") == 0) return T;
    return -1;
}
