// L-BFGS vector passes for the CuPy backend (kernels/vector_cupy.py): the operations of
// kernels/vector_cuda.py in CUDA C, giving the same bits as that module's numba-cuda kernels.
//
// One template, fo::vec::pass<Op, F>, with an element functor per operation (Op::element) that
// updates element i of up to five arrays and folds up to two float64 values of it into the
// thread's running sums; Op::max_second says whether the second is maxed instead of summed,
// Op::reduces whether there is anything to reduce at all (copy, scale and fill write no
// partials). The kernels, one per (operation, dtype), are generated from FO_VECTOR_OPS:
//
//   fo_vec_<op>_f32/_f64(long long n, double* out, F* a0, F* a1, F* a2, F* a3, F* a4,
//                        double s, double u)
//
// (unused array slots are null; s and u are the operation's scalars). Launch with blockDim.x ==
// FO_REDUCTION_THREADS (T) and any grid: chunk c = [c * CHUNK, min((c + 1) * CHUNK, n)) is
// handled by block c mod gridDim.x; thread t visits lo + t, lo + t + T, ... in index order,
// updating each element and adding the element's values to its two running sums; then the block
// adds its T sums pairwise (s[t] += s[t + half], half = T/2, ..., 1) and writes out[c] and
// out[nchunks + c] (the (2, nchunks) partials, summed on the host in index order). The order of
// every operation depends on (n, T) only, never on the grid.
//
// Rounding, as numba-cuda compiles vector_cuda.py for a GPU: a product added to a running sum is
// one fused multiply-add (NVVM contracts `acc += x * y`), the axpys q + a*x are the explicit fma
// of vector_cuda.py (cuda.fma), every other operation one explicitly rounded IEEE operation
// (fo::ieee, no flush to zero; CuPy compiles with -ftz=true); a store rounds to the array's
// dtype (cvt.rn) and the value reduced is the one stored, read back.
//
// fo::vec::lane and fo::vec::tree_level are __host__ __device__: the test harness
// (tests/vector_host_harness.cu) runs them for every thread of a block in turn, on host arrays.

#define FO_ENABLE_RULES 0
#include "optim_kernels.cu"

namespace fo {
namespace vec {

typedef ieee<double> D;

// a*b + c with one rounding.
FO_HD D fma_rn(D a, D b, D c) {
#if defined(__CUDA_ARCH__)
    double r;
    asm("fma.rn.f64 %0, %1, %2, %3;" : "=d"(r) : "d"(a.v), "d"(b.v), "d"(c.v));
    return D(r);
#else
    return D(fma(a.v, b.v, c.v));
#endif
}

// Python's max(acc, v) as numba compiles it: v if v > acc, else acc (a NaN v is dropped).
FO_HD D max_of(D acc, D v) { return v > acc ? v : acc; }

template <typename F>
FO_HD D load(const F* a, long long i) {
    return D(widen(a[i]));
}

template <typename F>
FO_HD void store(F* a, long long i, D v) {
    convert(a[i], v.v);
}

// ---------------------------------------------------------------------------------------------
// Element functors: element(i, a0..a4, s, u, acc0, acc1) updates element i and folds its
// values into the thread's two running sums (acc1 maxed when max_second): a product with one
// fma, as numba-cuda's compiled `acc += x * y`.

struct Dot {  // a0 . a1
    static const bool reduces = true, max_second = false;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F* a1, F*, F*, F*, D, D, D& acc0, D&) {
        acc0 = fma_rn(load(a0, i), load(a1, i), acc0);
    }
};

struct UpdateDot {  // a0 <- u * (a0 + s*a1) (the sum one fma), then a2 . a0
    static const bool reduces = true, max_second = false;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F* a1, F* a2, F*, F*, D s, D u, D& acc0, D&) {
        store(a0, i, fma_rn(s, load(a1, i), load(a0, i)));
        store(a0, i, u * load(a0, i));
        acc0 = fma_rn(load(a2, i), load(a0, i), acc0);
    }
};

struct ScaleDot {  // a0 <- s * a1, then a2 . a0
    static const bool reduces = true, max_second = false;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F* a1, F* a2, F*, F*, D s, D, D& acc0, D&) {
        store(a0, i, s * load(a1, i));
        acc0 = fma_rn(load(a2, i), load(a0, i), acc0);
    }
};

struct Pair {  // y = a3 <- a0 - a1 (in F), s = a4 <- s * a2; (y . s, y . y)
    static const bool reduces = true, max_second = false;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F* a1, F* a2, F* a3, F* a4, D s, D, D& acc0,
                              D& acc1) {
        a3[i] = (ieee<F>(a0[i]) - ieee<F>(a1[i])).v;
        store(a4, i, load(a2, i) * s);
        const D y = load(a3, i);
        acc0 = fma_rn(y, load(a4, i), acc0);
        acc1 = fma_rn(y, y, acc1);
    }
};

struct AbsSumMax {  // (sum |a0|, max |a0|)
    static const bool reduces = true, max_second = true;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F*, F*, F*, F*, D, D, D& acc0, D& acc1) {
        const D v = fo_abs(load(a0, i));
        acc0 = acc0 + v;
        acc1 = max_of(acc1, v);
    }
};

struct AxpyAbsMax {  // a0 <- a0 + s*a1 (one fma); max |a1|
    static const bool reduces = true, max_second = true;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F* a1, F*, F*, F*, D s, D, D&, D& acc1) {
        store(a0, i, fma_rn(s, load(a1, i), load(a0, i)));
        acc1 = max_of(acc1, fo_abs(load(a1, i)));
    }
};

struct Scale {  // a0 <- s * a1
    static const bool reduces = false, max_second = false;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F* a1, F*, F*, F*, D s, D, D&, D&) {
        store(a0, i, s * load(a1, i));
    }
};

struct Copy {  // a0 <- a1
    static const bool reduces = false, max_second = false;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F* a1, F*, F*, F*, D, D, D&, D&) {
        a0[i] = a1[i];
    }
};

struct Fill {  // a0 <- s
    static const bool reduces = false, max_second = false;
    template <typename F>
    static FO_HD void element(long long i, F* a0, F*, F*, F*, F*, D s, D, D&, D&) {
        store(a0, i, s);
    }
};

// ---------------------------------------------------------------------------------------------
// The pass.

// Thread t's share of chunk [lo, hi): element() for i = lo + t, lo + t + T, ... < hi, in that
// order, with its two running sums (from 0).
template <class Op, typename F>
FO_HD void lane(F* a0, F* a1, F* a2, F* a3, F* a4, double s, double u, long long lo,
                long long hi, int t, double& r0, double& r1) {
    D acc0(0.0), acc1(0.0);
    for (long long i = lo + t; i < hi; i += FO_REDUCTION_THREADS) {
        Op::element(i, a0, a1, a2, a3, a4, D(s), D(u), acc0, acc1);
    }
    r0 = acc0.v;
    r1 = acc1.v;
}

// One level of the block's tree: s0[t] += s0[t + half] (s1 likewise, or maxed) for t < half.
template <class Op>
FO_HD void tree_level(double* s0, double* s1, int t, int half) {
    if (t < half) {
        s0[t] = (D(s0[t]) + D(s0[t + half])).v;
        s1[t] = Op::max_second ? max_of(D(s1[t]), D(s1[t + half])).v
                               : (D(s1[t]) + D(s1[t + half])).v;
    }
}

template <class Op, typename F>
__device__ __forceinline__ void pass(long long n, double* out, F* a0, F* a1, F* a2, F* a3,
                                     F* a4, double s, double u) {
    __shared__ double s0[FO_REDUCTION_THREADS];
    __shared__ double s1[FO_REDUCTION_THREADS];
    const int t = threadIdx.x;
    const long long nchunks = (n + (FO_REDUCTION_CHUNK - 1)) / FO_REDUCTION_CHUNK;
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const long long lo = c * FO_REDUCTION_CHUNK;
        const long long hi = lo + FO_REDUCTION_CHUNK < n ? lo + FO_REDUCTION_CHUNK : n;
        double r0, r1;
        lane<Op>(a0, a1, a2, a3, a4, s, u, lo, hi, t, r0, r1);
        if (Op::reduces) {
            s0[t] = r0;
            s1[t] = r1;
            __syncthreads();
            for (int half = FO_REDUCTION_THREADS / 2; half > 0; half >>= 1) {
                tree_level<Op>(s0, s1, t, half);
                __syncthreads();
            }
            if (t == 0) {
                out[c] = s0[0];
                out[nchunks + c] = s1[0];
            }
            __syncthreads();  // s0 and s1 are reused by the next chunk
        }
    }
}

}  // namespace vec
}  // namespace fo

// X(name, functor): every operation, in kernels/vector_cupy.py's OPS order.
#define FO_VECTOR_OPS(X)           \
    X(dot, Dot)                    \
    X(update_dot, UpdateDot)       \
    X(scale_dot, ScaleDot)         \
    X(pair, Pair)                  \
    X(abs, AbsSumMax)              \
    X(axpy_absmax, AxpyAbsMax)     \
    X(scale, Scale)                \
    X(copy, Copy)                  \
    X(fill, Fill)

#define FO_VECTOR_KERNEL(name, Op, F, suffix)                                                  \
    extern "C" __global__ void fo_vec_##name##_##suffix(long long n, double* out, F* a0, F* a1, \
                                                         F* a2, F* a3, F* a4, double s,        \
                                                         double u) {                           \
        fo::vec::pass<fo::vec::Op, F>(n, out, a0, a1, a2, a3, a4, s, u);                       \
    }
#define FO_VECTOR_KERNELS(name, Op)          \
    FO_VECTOR_KERNEL(name, Op, float, f32)   \
    FO_VECTOR_KERNEL(name, Op, double, f64)

// FO_ENABLE_VECTOR_KERNELS 0 leaves the kernels out (the host harness needs the functions only).
#ifndef FO_ENABLE_VECTOR_KERNELS
#define FO_ENABLE_VECTOR_KERNELS 1
#endif
#if FO_ENABLE_VECTOR_KERNELS
FO_VECTOR_OPS(FO_VECTOR_KERNELS)
#endif

#undef FO_VECTOR_KERNELS
#undef FO_VECTOR_KERNEL
