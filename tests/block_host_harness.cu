// Host harness for kernels/block_kernels.cu (tests/test_int8_cupy.py): the quantizer helpers of
// quantizer.cuh over arrays, and a block kernel's launch run on host arrays with the kernel's own
// __host__ __device__ steps, the block's threads emulated in order: per quantization block,
// block_element for threads 0..255 (each thread's maximum folded into the block's, as the
// shared-memory atomicMax does), then block_requantize for every thread. Built once by nvcc as a
// shared library and loaded with ctypes; the CuPy launcher's launches reach it through a fake
// CuPy. On the host every operation is rounded separately: the numba-cpu block loops' arithmetic.

#include <cstring>

#include "block_kernels.cu"

namespace {

template <class Op, typename C, typename P, typename G, bool MASTER, bool SR>
void host_block(void* p, float* w, const void* g, const fo::quant_slot* slots, long long n,
                const void* hs, double gscale, double clip, unsigned long long seed,
                unsigned long long step, unsigned long long index0) {
    const int NS = Op::num_states;
    const fo::Scalars<C>& sc = *static_cast<const fo::Scalars<C>*>(hs);
    fo::ieee<C> h[FO_MAX_SCALARS];
    for (int k = 0; k < FO_MAX_SCALARS; ++k) h[k] = fo::ieee<C>(sc.v[k]);
    const fo::ieee<C> gs(static_cast<C>(gscale)), cl(static_cast<C>(clip));
    static float v[FO_QUANT_BLOCK][3];
    const long long nblocks = (n + FO_QUANT_BLOCK - 1) / FO_QUANT_BLOCK;
    for (long long b = 0; b < nblocks; ++b) {
        unsigned int top[3] = {0u, 0u, 0u};
        for (int t = 0; t < FO_QUANT_BLOCK; ++t) {
            const long long i = b * FO_QUANT_BLOCK + t;
            if (i >= n) continue;
            fo::block_element<Op, C, P, G, MASTER, SR>(i, b, static_cast<P*>(p), w,
                                                       static_cast<const G*>(g), slots, h, gs,
                                                       cl, seed, step, index0, v[t]);
            for (int j = 0; j < NS; ++j) {
                const unsigned int m = fo::magnitude_bits(v[t][j]);
                top[j] = m > top[j] ? m : top[j];
            }
        }
        for (int t = 0; t < FO_QUANT_BLOCK; ++t) {
            const long long i = b * FO_QUANT_BLOCK + t;
            if (i >= n) continue;
            for (int j = 0; j < NS; ++j) fo::block_requantize(slots[j], i, b, top[j], v[t][j], t == 0);
        }
    }
}

}  // namespace

// The kernels this harness runs, as block_cupy.kernel_name / instantiation spell them.
#define FO_HOST_BLOCKS(X)                                                                    \
    X(fo_block_adam_f32_f32_f32, fo::op_adam, float, float, float, false, false)             \
    X(fo_block_sgd_momentum_f32_f32_f32, fo::op_sgd_momentum, float, float, float, false,    \
      false)                                                                                 \
    X(fo_block_adam_amsgrad_f32_f32_f32, fo::op_adam_amsgrad, float, float, float, false,    \
      false)                                                                                 \
    X(fo_block_adam_bf16_bf16_f32_master, fo::op_adam, float, fo::bf16_bits, fo::bf16_bits,  \
      true, false)                                                                           \
    X(fo_block_adam_bf16_bf16_f32_sr, fo::op_adam, float, fo::bf16_bits, fo::bf16_bits, false, \
      true)

// One launch of kernel `name` over host arrays (slots: codes, absmax, map, table per slot; the
// unused ones null); h points to the fo::Scalars struct. -1 for a kernel it does not run.
extern "C" int fo_host_block(const char* name, void* p, float* w, const void* g,
                             unsigned char* const* codes, float* const* absmax,
                             const float* const* qmap, const int* const* lut, long long n,
                             const void* h, double gscale, double clip, unsigned long long seed,
                             unsigned long long step, unsigned long long index0) {
    fo::quant_slot slots[3];
    for (int j = 0; j < 3; ++j) slots[j] = fo::quant_slot{codes[j], absmax[j], qmap[j], lut[j]};
#define FO_HOST_CASE(NAME, OP, C, P, G, MASTER, SR)                                            \
    if (std::strcmp(name, #NAME) == 0) {                                                      \
        host_block<OP, C, P, G, MASTER, SR>(p, w, g, slots, n, h, gscale, clip, seed, step, \
                                            index0);                                          \
        return 0;                                                                             \
    }
    FO_HOST_BLOCKS(FO_HOST_CASE)
    return -1;
}

// The quantizer helpers over n values: bucket, nearest code and magnitude bits of x[k] in the
// map with table lut, and normalized(x[k], block_inverse(scale[k])).
extern "C" void fo_host_quantizer(const float* x, const float* scale, long long n,
                                  const float* qmap, const int* lut, unsigned int* bucket,
                                  unsigned char* code, unsigned int* magnitude, float* xn) {
    for (long long k = 0; k < n; ++k) {
        bucket[k] = fo::bucket_of(x[k]);
        code[k] = (unsigned char)fo::nearest_code(x[k], qmap, lut);
        magnitude[k] = fo::magnitude_bits(x[k]);
        xn[k] = fo::normalized(x[k], fo::block_inverse(scale[k]));
    }
}

// The constants the kernels were built with.
extern "C" long long fo_host_block_constant(const char* name) {
    if (std::strcmp(name, "KEY_LO") == 0) return FO_KEY_LO;
    if (std::strcmp(name, "KEY_HI") == 0) return FO_KEY_HI;
    if (std::strcmp(name, "BUCKETS") == 0) return FO_BUCKETS;
    if (std::strcmp(name, "QUANT_BLOCK") == 0) return FO_QUANT_BLOCK;
    return -1;
}
