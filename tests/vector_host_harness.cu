// Host harness for kernels/vector_kernels.cu (tests/test_lbfgs_cupy.py): the L-BFGS vector
// passes run on host arrays, the block and thread loops of fo::vec::pass emulated in the same
// order: for each chunk, fo::vec::lane for threads 0..T-1, then each tree level for every
// thread in turn (a __syncthreads between levels). Built by nvcc as a shared library, loaded
// with ctypes; the CuPy launcher's launches are routed here through a fake CuPy.

#include <cstring>

#define FO_ENABLE_VECTOR_KERNELS 0  // no device code to build: the functions run on the host
#include "vector_kernels.cu"

namespace {

const int T = FO_REDUCTION_THREADS;

template <class Op, typename F>
void host_pass(long long n, double* out, F* a0, F* a1, F* a2, F* a3, F* a4, double s,
               double u) {
    double s0[T], s1[T];
    const long long nchunks = (n + FO_REDUCTION_CHUNK - 1) / FO_REDUCTION_CHUNK;
    for (long long c = 0; c < nchunks; ++c) {
        const long long lo = c * FO_REDUCTION_CHUNK;
        const long long hi = lo + FO_REDUCTION_CHUNK < n ? lo + FO_REDUCTION_CHUNK : n;
        for (int t = 0; t < T; ++t) {
            fo::vec::lane<Op>(a0, a1, a2, a3, a4, s, u, lo, hi, t, s0[t], s1[t]);
        }
        if (Op::reduces) {
            for (int half = T / 2; half > 0; half >>= 1) {
                for (int t = 0; t < T; ++t) fo::vec::tree_level<Op>(s0, s1, t, half);
            }
            out[c] = s0[0];
            out[nchunks + c] = s1[0];
        }
    }
}

template <typename F>
int dispatch(const char* name, long long n, double* out, void* a0, void* a1, void* a2, void* a3,
             void* a4, double s, double u) {
#define FO_HOST_CASE(op, Op)                                                                 \
    if (std::strcmp(name, #op) == 0) {                                                       \
        host_pass<fo::vec::Op, F>(n, out, static_cast<F*>(a0), static_cast<F*>(a1),          \
                                  static_cast<F*>(a2), static_cast<F*>(a3),                  \
                                  static_cast<F*>(a4), s, u);                                \
        return 0;                                                                            \
    }
    FO_VECTOR_OPS(FO_HOST_CASE)
#undef FO_HOST_CASE
    return -1;
}

}  // namespace

// Runs operation `name` (an FO_VECTOR_OPS name) over float (double_ == 0) or double arrays;
// unused array slots may be null. Returns -1 for an unknown name.
extern "C" int fo_host_vector(const char* name, int double_, long long n, double* out, void* a0,
                              void* a1, void* a2, void* a3, void* a4, double s, double u) {
    if (double_) return dispatch<double>(name, n, out, a0, a1, a2, a3, a4, s, u);
    return dispatch<float>(name, n, out, a0, a1, a2, a3, a4, s, u);
}

extern "C" int fo_host_vector_threads() { return T; }
