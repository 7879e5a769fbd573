// fastopt block kernels for CuPy: 8-bit blockwise optimizer state (state_dtype="int8"), the
// block loops of kernels/block_loops.py in CUDA C, laid out as numba-cuda's kernels/block_cuda.py.
//
// State: per slot one uint8 code per element and one float32 absmax per block of FO_QUANT_BLOCK
// (256) elements of the flat state (the last block may be partial), an element's value
// qmap[code] * absmax with the signed or unsigned dynamic map; the map (256 floats) and its
// quantizer table (block_loops.quantizer_table, int32) are device arrays passed per slot.
//
// One CUDA block of FO_QUANT_BLOCK threads per quantization block (block-stride over the blocks
// when the grid is smaller), one element per thread:
//   1. block_element: dequantize the element's slots (storage.cuh's dequantize), run the rule of
//      rules.cuh unchanged through optim_kernels.cu's storage_element_at (the loads, conversions
//      and stores of 16-bit parameters, master weights and stochastic rounding of the storage
//      kernels), keeping the new state values in float32;
//   2. the block's new absmax per slot: the largest magnitude_bits of its new values, an integer
//      atomicMax in shared memory (exact and order-free; a NaN lies above every magnitude);
//   3. block_requantize: the block's first thread stores the absmax, each thread the nearest
//      code of its value over it (quantizer.cuh).
// Steps 1 and 3 are __host__ __device__ so that the host harness (tests/block_host_harness.cu)
// runs them with the block's threads in order and compares them with the numba-cpu block loops.
//
// Standalone passes over one slot, for the kernels that run on float32 copies of 8-bit state
// (fastopt/optim/staging.py; block_loops.dequantize_into / quantize_from on the CPU), laid out
// as the block kernels: block_dequantize (step 1's dequantization alone) and the quantize pass
// (step 2's maximum, then block_requantize), spelled once by the launcher as FO_BLOCK_PASSES:
//   fo_block_dequantize(const unsigned char* codes, const float* absmax, const float* qmap,
//                       float* out, long long n)
//   fo_block_quantize(unsigned char* codes, float* absmax, const float* qmap, const int* lut,
//                     const float* values, long long n)
// (tests/test_int8_convert_cuda_c.py runs their per-block bodies on the host).
//
// Kernels: one extern "C" wrapper per (rule, storage combination), spelled by the CuPy launcher
// (kernels/block_cupy.py) as
//   FO_BLOCK_KERNEL(name, fo::op_adam, float, fo::bf16_bits, float, true, false)
//   name(P* p, float* w, const G* g, [unsigned char* codes, float* absmax, const float* qmap,
//        const int* lut] x 3 slots (unused ones null), long long n, fo::Scalars<C> h, C gscale,
//        C clip, unsigned long long seed, unsigned long long step, unsigned long long index0)
// with the arguments of optim_kernels.cu's storage_kernel. Launch with FO_QUANT_BLOCK threads.

#ifndef FO_ENABLE_RULES
#define FO_ENABLE_RULES 0
#endif
#ifndef FO_ENABLE_STORAGE
#define FO_ENABLE_STORAGE 1
#endif

#include "optim_kernels.cu"
#include "quantizer.cuh"

namespace fo {

// One 8-bit slot: codes, block absmax, map, quantizer table.
struct quant_slot {
    unsigned char* codes;
    float* absmax;
    const float* qmap;
    const int* lut;
};

// Element i (of block b): the rule over the dequantized state, the parameter stored; the new
// state values in v[0 .. num_states - 1] (float32).
template <class Op, typename C, typename P, typename G, bool MASTER, bool SR>
FO_HD void block_element(long long i, long long b, P* p, float* w, const G* g,
                         const quant_slot* slots, const ieee<C>* h, ieee<C> gscale,
                         ieee<C> clip, unsigned long long seed, unsigned long long step,
                         unsigned long long index0, float* v) {
    const int NS = Op::num_states;
#pragma unroll
    for (int j = 0; j < NS; ++j) {
        v[j] = dequantize(slots[j].codes[i], slots[j].absmax[b], slots[j].qmap);
    }
    float* const at[3] = {v, v + 1, v + 2};
    storage_element_at<Op, C, P, G, float, MASTER, SR>(
        0, index0 + (unsigned long long)i, p + i, MASTER ? w + i : w, g + i, at, h, gscale, clip,
        seed, step);
}

// Element i of block b of a slot after the block's maxima are known: ``top`` the largest
// magnitude bits of the block's new values; ``first``: this thread stores the absmax.
FO_HD void block_requantize(const quant_slot& s, long long i, long long b, unsigned int top,
                            float v, bool first) {
    const float block_max = bits_float32(top);
    if (first) s.absmax[b] = block_max;
    s.codes[i] = (unsigned char)nearest_code(normalized(v, block_inverse(block_max)), s.qmap,
                                             s.lut);
}

// Element i (of block b) of a slot dequantized into out[i]: block_element's first step.
FO_HD void block_dequantize(const unsigned char* codes, const float* absmax, const float* qmap,
                            long long i, long long b, float* out) {
    out[i] = dequantize(codes[i], absmax[b], qmap);
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// The dequantize pass: one thread per element, one CUDA block per quantization block.
__device__ __forceinline__ void block_dequantize_kernel(const unsigned char* __restrict__ codes,
                                                        const float* __restrict__ absmax,
                                                        const float* __restrict__ qmap,
                                                        float* __restrict__ out, long long n) {
    const long long nblocks = (n + FO_QUANT_BLOCK - 1) / FO_QUANT_BLOCK;
    for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const long long i = b * FO_QUANT_BLOCK + threadIdx.x;
        if (i < n) block_dequantize(codes, absmax, qmap, i, b, out);
    }
}

// The quantize pass: the block kernel's steps 2 and 3 over given values.
__device__ __forceinline__ void block_quantize_kernel(quant_slot s,
                                                      const float* __restrict__ values,
                                                      long long n) {
    __shared__ unsigned int top;
    const int tid = threadIdx.x;
    const long long nblocks = (n + FO_QUANT_BLOCK - 1) / FO_QUANT_BLOCK;
    for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
        if (tid == 0) top = 0u;
        __syncthreads();
        const long long i = b * FO_QUANT_BLOCK + tid;
        float v = 0.0f;
        if (i < n) {
            v = values[i];
            atomicMax(&top, magnitude_bits(v));
        }
        __syncthreads();  // the block's maximum taken
        if (i < n) block_requantize(s, i, b, top, v, tid == 0);
        __syncthreads();  // top is reset for the next block
    }
}

template <class Op, typename C, typename P, typename G, bool MASTER, bool SR>
__device__ __forceinline__ void block_kernel(P* __restrict__ p, float* __restrict__ w,
                                             const G* __restrict__ g, quant_slot s0,
                                             quant_slot s1, quant_slot s2, long long n,
                                             const Scalars<C>& hs, C gscale, C clip,
                                             unsigned long long seed, unsigned long long step,
                                             unsigned long long index0) {
    const int NS = Op::num_states;
    __shared__ unsigned int top[3];
    ieee<C> h[FO_MAX_SCALARS];
#pragma unroll
    for (int k = 0; k < FO_MAX_SCALARS; ++k) h[k] = ieee<C>(hs.v[k]);
    const quant_slot slots[3] = {s0, s1, s2};
    const ieee<C> gs(gscale), cl(clip);
    const int tid = threadIdx.x;
    const long long nblocks = (n + FO_QUANT_BLOCK - 1) / FO_QUANT_BLOCK;
    for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
        if (tid < NS) top[tid] = 0u;
        __syncthreads();
        const long long i = b * FO_QUANT_BLOCK + tid;
        float v[3] = {0.0f, 0.0f, 0.0f};
        if (i < n) {
            block_element<Op, C, P, G, MASTER, SR>(i, b, p, w, g, slots, h, gs, cl, seed, step,
                                                   index0, v);
#pragma unroll
            for (int j = 0; j < NS; ++j) atomicMax(&top[j], magnitude_bits(v[j]));
        }
        __syncthreads();  // every maximum taken, every absmax of the block read
        if (i < n) {
#pragma unroll
            for (int j = 0; j < NS; ++j) block_requantize(slots[j], i, b, top[j], v[j], tid == 0);
        }
        __syncthreads();  // top is reset for the next block
    }
}

#endif

}  // namespace fo

#define FO_BLOCK_SLOT(k) \
    unsigned char *c##k, float *a##k, const float *q##k, const int *l##k
#define FO_BLOCK_KERNEL(NAME, OP, C, P, G, MASTER, SR)                                        \
    extern "C" __global__ void __launch_bounds__(FO_QUANT_BLOCK)                              \
        NAME(P* p, float* w, const G* g, FO_BLOCK_SLOT(0), FO_BLOCK_SLOT(1), FO_BLOCK_SLOT(2), \
             long long n, fo::Scalars<C> hs, C gscale, C clip, unsigned long long seed,       \
             unsigned long long step, unsigned long long index0) {                            \
        const fo::quant_slot s0 = {c0, a0, q0, l0}, s1 = {c1, a1, q1, l1},                    \
                             s2 = {c2, a2, q2, l2};                                           \
        fo::block_kernel<OP, C, P, G, MASTER, SR>(p, w, g, s0, s1, s2, n, hs, gscale, clip,   \
                                                  seed, step, index0);                        \
    }

#define FO_BLOCK_PASSES                                                                         \
    extern "C" __global__ void __launch_bounds__(FO_QUANT_BLOCK)                              \
        fo_block_dequantize(const unsigned char* codes, const float* absmax, const float* qmap, \
                            float* out, long long n) {                                         \
        fo::block_dequantize_kernel(codes, absmax, qmap, out, n);                               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FO_QUANT_BLOCK)                              \
        fo_block_quantize(unsigned char* codes, float* absmax, const float* qmap,              \
                          const int* lut, const float* values, long long n) {                  \
        const fo::quant_slot s = {codes, absmax, qmap, lut};                                    \
        fo::block_quantize_kernel(s, values, n);                                                \
    }
