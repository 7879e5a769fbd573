// Host-side test harness for the storage kernels of kernels/optim_kernels.cu (tests/test_cuda_c.py).
//
// Compiled by nvcc as a shared library with the storage section on (FO_ENABLE_STORAGE), loaded
// with ctypes: fo_host_storage_apply runs fo::storage_pack and fo::storage_element, the loop
// bodies of fo::storage_kernel (__host__ __device__), in the kernel's order over host arrays for one rule and storage
// combination picked at run time, so the tests can compare it bit for bit with the Numba CPU
// storage kernels (kernels/cpu_storage.py). The rules compute in float here (the 16-bit
// storage combinations); rule names are those of FO_RULES handled below.

#define FO_ENABLE_RULES 0
#define FO_ENABLE_STORAGE 1
#include <cstring>

#include "optim_kernels.cu"

namespace {

typedef unsigned long long u64;

struct Args {
    long long n;
    void* p;
    float* w;
    const void* g;
    void* s[3];
    const float* h;
    float gscale, clip;
    u64 seed, step, index0;
};

template <class Op, typename P, typename G, typename S, bool MASTER, bool SR>
void run(const Args& a) {
    fo::ieee<float> h[FO_MAX_SCALARS];
    for (int k = 0; k < FO_MAX_SCALARS; ++k) h[k] = fo::ieee<float>(a.h[k]);
    S* sp[3] = {static_cast<S*>(a.s[0]), static_cast<S*>(a.s[1]), static_cast<S*>(a.s[2])};
    P* p = static_cast<P*>(a.p);
    const G* g = static_cast<const G*>(a.g);
    const fo::ieee<float> gscale(a.gscale), clip(a.clip);
    // fo::storage_kernel's order of work, one thread: the aligned packs, then the tail
    long long done = 0;
    if (fo::storage_packable<Op, P, G, S, MASTER>(p, a.w, g, sp)) {
        for (long long q = 0; q < a.n / FO_PACK; ++q) {
            fo::storage_pack<Op, float, P, G, S, MASTER, SR>(q, p, a.w, g, sp, h, gscale, clip,
                                                             a.seed, a.step, a.index0);
        }
        done = a.n / FO_PACK * FO_PACK;
    }
    for (long long i = done; i < a.n; ++i) {
        fo::storage_element<Op, float, P, G, S, MASTER, SR>(i, p, a.w, g, sp, h, gscale, clip,
                                                             a.seed, a.step, a.index0);
    }
}

typedef void (*Runner)(const Args&);

struct Combination {
    int p, g, s, master, sr;  // element types: 0 float, 1 bfloat16 bits, 2 float16 bits
    Runner adam, sgd_momentum;
};

#define FO_COMBINATION(P, G, S, M, R, TP, TG, TS)                                     \
    {P, G, S, M, R, run<fo::op_adam, TP, TG, TS, (M) != 0, (R) != 0>,                 \
     run<fo::op_sgd_momentum, TP, TG, TS, (M) != 0, (R) != 0>}

typedef fo::bf16_bits bf;
typedef fo::f16_bits hf;

// The combinations the tests run (instantiating all 216 would make the build slow).
const Combination kCombinations[] = {
    FO_COMBINATION(1, 1, 1, 0, 0, bf, bf, bf),  // bfloat16 everything
    FO_COMBINATION(1, 1, 1, 0, 1, bf, bf, bf),  // ... stochastic rounding
    FO_COMBINATION(2, 2, 2, 0, 0, hf, hf, hf),  // float16 everything
    FO_COMBINATION(2, 2, 2, 0, 1, hf, hf, hf),  // ... stochastic rounding
    FO_COMBINATION(1, 0, 1, 0, 0, bf, float, bf),  // float32 gradients for bfloat16
    FO_COMBINATION(0, 1, 0, 0, 0, float, bf, float),  // bfloat16 gradients for float32
    FO_COMBINATION(1, 1, 0, 1, 0, bf, bf, float),  // master weights, float32 state
    FO_COMBINATION(2, 2, 0, 1, 1, hf, hf, float),  // master weights, stochastic rounding
    FO_COMBINATION(0, 0, 1, 0, 1, float, float, bf),  // bfloat16 state, stochastic rounding
};

}  // namespace

// h points to FO_MAX_SCALARS floats; unused state pointers may be null, w too without master.
// Returns 0, -1 for a rule this harness does not instantiate, -2 for a combination it does not.
extern "C" int fo_host_storage_apply(const char* rule, int p_type, int g_type, int s_type,
                                     int master, int sr, long long n, void* p, float* w,
                                     const void* g, void* s0, void* s1, void* s2,
                                     const float* h, float gscale, float clip, u64 seed,
                                     u64 step, u64 index0) {
    const Args a = {n, p, w, g, {s0, s1, s2}, h, gscale, clip, seed, step, index0};
    const bool adam = std::strcmp(rule, "adam") == 0;
    if (!adam && std::strcmp(rule, "sgd_momentum") != 0) return -1;
    for (const Combination& c : kCombinations) {
        if (c.p == p_type && c.g == g_type && c.s == s_type && c.master == master && c.sr == sr) {
            (adam ? c.adam : c.sgd_momentum)(a);
            return 0;
        }
    }
    return -2;
}
