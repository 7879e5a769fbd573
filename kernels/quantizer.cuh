// fastopt 8-bit blockwise quantizer in CUDA C: the per-element helpers of kernels/block_loops.py
// (same names, same integer arithmetic), for the CuPy block kernels (block_kernels.cu) and their
// host harness (tests/block_host_harness.cu).
//
// The nearest code of a value over its block's absmax is one lookup in the quantizer table of its
// map (block_loops.quantizer_table: per bucket of floats sharing sign, exponent and 7 mantissa
// bits, `code | threshold << 8`) and one integer comparison; block_loops.py documents why that is
// exactly storage.quantize's nearest code with ties to the even code. Everything here is integer
// arithmetic but `normalized`, a float64 product rounded once to float32 through optim_kernels.cu's
// widen/narrow (explicit cvt, never flushed under CuPy's -ftz=true): include this file after
// optim_kernels.cu. tests/test_int8_cupy.py checks every helper against block_loops' bit for bit.

#ifndef FASTOPT_QUANTIZER_CUH
#define FASTOPT_QUANTIZER_CUH

#include "storage.cuh"

// Bucket keys (15 bits of exponent and 7 mantissa bits of a magnitude): block_loops.KEY_LO,
// KEY_HI and BUCKETS (buckets per sign; a table holds 2 * FO_BUCKETS entries).
#define FO_KEY_LO (104u << 7)
#define FO_KEY_HI (128u << 7)
#define FO_BUCKETS (FO_KEY_HI - FO_KEY_LO + 2u)

namespace fo {

// The bucket (index into a quantizer table) of float32 xn.
FO_STORAGE_HD unsigned int bucket_of(float xn) {
    const unsigned int u = float32_bits(xn);
    unsigned int key = (u >> 16) & 0x7FFFu;
    key = key > FO_KEY_LO - 1u ? key : FO_KEY_LO - 1u;
    key = key < FO_KEY_HI ? key : FO_KEY_HI;
    return (key - (FO_KEY_LO - 1u)) + ((0u - (u >> 31)) & FO_BUCKETS);
}

// The code of xn from its bucket's table entry; in the signed map a negative xn (or -0.0) whose
// nearest code is zero's (127) gets 126, keeping its sign.
FO_STORAGE_HD unsigned int code_in_bucket(float xn, int entry, bool is_signed) {
    const unsigned int u = float32_bits(xn);
    const unsigned int negative = u >> 31;
    const unsigned int low = (u ^ (0u - negative)) & 0xFFFFu;
    const unsigned int e = (unsigned int)entry;
    const unsigned int code = (e & 0xFFu) + (low >= (e >> 8) ? 1u : 0u);
    const unsigned int keep_sign = (code == 127u ? 1u : 0u) & negative & (is_signed ? 1u : 0u);
    return code - keep_sign;
}

// The code of xn in map qmap (the signed map starts below zero) with lookup table lut.
FO_STORAGE_HD unsigned int nearest_code(float xn, const float* qmap, const int* lut) {
    return code_in_bucket(xn, lut[bucket_of(xn)], st_lt(qmap[0], 0.0f));
}

// The bits of |x|, ordered as the magnitudes with NaN above Inf: an integer max over a block is
// its absmax (a NaN when it holds one).
FO_STORAGE_HD unsigned int magnitude_bits(float x) { return float32_bits(x) & 0x7FFFFFFFu; }

// x / scale rounded to float32, from inverse = 1 / scale in float64: float32(x * inverse)
// computed in float64 (block_loops.normalized: bit-identical to the float32 division).
FO_STORAGE_HD float normalized(float x, double inverse) { return narrow(widen(x) * inverse); }

// 1 / scale in float64 for the block's absmax block_max (bits_float32 of the largest magnitude
// bits): an all-zero block (or a NaN absmax) is scaled by 1, which gives the code of zero.
FO_STORAGE_HD double block_inverse(float block_max) {
    const float scale = st_gt(block_max, 0.0f) ? block_max : 1.0f;
    return 1.0 / widen(scale);
}

}  // namespace fo

#endif  // FASTOPT_QUANTIZER_CUH
