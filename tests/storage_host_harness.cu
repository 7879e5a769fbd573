// Host-side test harness for kernels/storage.cuh (tests/test_storage.py).
//
// Compiled by nvcc as a shared library (the helpers are __host__ __device__ and go through nvcc's
// front end), loaded with ctypes. Each entry point applies one helper elementwise over host
// arrays, so the tests can compare it bit for bit with kernels/storage.py.

#include "storage.cuh"

namespace {

const float kSignedMap[256] = FO_DYNAMIC_MAP_SIGNED;
const float kUnsignedMap[256] = FO_DYNAMIC_MAP_UNSIGNED;

const float* qmap(int is_signed) { return is_signed ? kSignedMap : kUnsignedMap; }

typedef unsigned long long u64;

}  // namespace

extern "C" {

void st_map(int is_signed, float* out) {
    for (int k = 0; k < 256; ++k) out[k] = qmap(is_signed)[k];
}

void st_bf16_to_f32(long long n, const unsigned short* in, float* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::bf16_to_f32(in[i]);
}

void st_f16_to_f32(long long n, const unsigned short* in, float* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::f16_to_f32(in[i]);
}

void st_f32_to_bf16_rne(long long n, const float* in, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::f32_to_bf16_rne(in[i]);
}

void st_f32_to_f16_rne(long long n, const float* in, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::f32_to_f16_rne(in[i]);
}

void st_f32_to_bf16_sr(long long n, const float* in, const unsigned int* rbits,
                       unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::f32_to_bf16_sr(in[i], rbits[i]);
}

void st_f32_to_f16_sr(long long n, const float* in, const unsigned int* rbits,
                      unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::f32_to_f16_sr(in[i], rbits[i]);
}

// Stochastic rounding of in[i] with random_bits(seed, step, index0 + i): is_f16 picks the format.
void st_sr_hashed(int is_f16, long long n, const float* in, u64 seed, u64 step, u64 index0,
                  unsigned short* out) {
    for (long long i = 0; i < n; ++i) {
        const unsigned int r = fo::random_bits(seed, step, index0 + (u64)i);
        out[i] = is_f16 ? fo::f32_to_f16_sr(in[i], r) : fo::f32_to_bf16_sr(in[i], r);
    }
}

// out[4 i .. 4 i + 3] = random_bits4(seed[i], step[i], index[i]).
void st_random_bits4(long long n, const u64* seed, const u64* step, const u64* index,
                     unsigned int* out) {
    for (long long i = 0; i < n; ++i) {
        const fo::Philox4 r = fo::random_bits4(seed[i], step[i], index[i]);
        for (int k = 0; k < 4; ++k) out[4 * i + k] = r.v[k];
    }
}

void st_random_bits(long long n, const u64* seed, const u64* step, const u64* index,
                    unsigned int* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::random_bits(seed[i], step[i], index[i]);
}

void st_philox(const unsigned int* counter, const unsigned int* key, unsigned int* out) {
    const fo::Philox4 r =
        fo::philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
    for (int k = 0; k < 4; ++k) out[k] = r.v[k];
}

void st_quantize(int is_signed, long long n, const float* xn, unsigned char* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::quantize(xn[i], qmap(is_signed));
}

void st_quantize_value(int is_signed, long long n, const float* x, const float* absmax,
                       unsigned char* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::quantize_value(x[i], absmax[i], qmap(is_signed));
}

void st_dequantize(int is_signed, long long n, const unsigned char* code, const float* absmax,
                   float* out) {
    for (long long i = 0; i < n; ++i) out[i] = fo::dequantize(code[i], absmax[i], qmap(is_signed));
}

// out[b] = block_absmax of block b of a (blocks of FO_QUANT_BLOCK, the last one may be short).
void st_block_absmax(long long n, const float* a, float* out) {
    for (long long b = 0; b * FO_QUANT_BLOCK < n; ++b) {
        const long long stop = (b + 1) * FO_QUANT_BLOCK < n ? (b + 1) * FO_QUANT_BLOCK : n;
        out[b] = fo::block_absmax(a, b * FO_QUANT_BLOCK, stop);
    }
}

int st_quant_block() { return FO_QUANT_BLOCK; }

}  // extern "C"
