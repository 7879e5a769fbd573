// fastopt storage helpers in CUDA C: the same bit manipulation as kernels/storage.py.
//
// bfloat16 and float16 values are their IEEE bits in an `unsigned short` (no cuda_bf16.h /
// cuda_fp16.h: the host build and NVRTC need no header); float <-> bits uses __float_as_uint /
// __uint_as_float on the device and __builtin_memcpy on the host. Every conversion and rounding
// is integer arithmetic, so flush-to-zero options (CuPy compiles with -ftz=true) do not change
// it; the few float operations of the 8-bit helpers are spelled as explicitly rounded PTX on the
// device (no .ftz, never fused), plain C++ on the host.
//
// storage.py documents each function (same names); tests/test_storage.py checks every one, bit
// for bit, against storage.py through the host harness tests/storage_host_harness.cu, and the
// tables FO_DYNAMIC_MAP_* against storage.dynamic_map (storage.dynamic_map_initializer writes
// them). The 8-bit helpers take the map as a pointer: the kernel decides where it lives
// (constant or shared memory), e.g. `__constant__ float qmap[256] = FO_DYNAMIC_MAP_SIGNED;`.
//
// No #include: the file must compile under NVRTC (no standard headers) as well as nvcc.

#ifndef FASTOPT_STORAGE_CUH
#define FASTOPT_STORAGE_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FO_STORAGE_HD __host__ __device__ __forceinline__
#else
#define FO_STORAGE_HD inline
#endif

// Elements per 8-bit quantization block (one float absmax each): storage.QUANT_BLOCK.
#define FO_QUANT_BLOCK 256

// The dynamic quantization maps of 8-bit state, signed (first moments) and unsigned (second
// moments): storage.DYNAMIC_MAP_SIGNED / _UNSIGNED, text from storage.dynamic_map_macros().
#define FO_DYNAMIC_MAP_SIGNED \
    {-0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f, -0x1.d86666p-1f, \
    -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f, \
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f, \
    -0x1.7accccp-1f, -0x1.73999ap-1f, -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f, \
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f, \
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f, \
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, -0x1.b8ccccp-2f, -0x1.aa6666p-2f, \
    -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f, \
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f, \
    -0x1.de6666p-3f, -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f, \
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f, -0x1.8851eep-4f, \
    -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f, \
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f, \
    -0x1.e51ebap-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f, \
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, \
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f, \
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f, \
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f, \
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f, \
    -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f, \
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f, \
    -0x1.27476ep-21f, 0x0p+0f, 0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f, \
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f, \
    0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f, \
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f, \
    0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f, \
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f, \
    0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f, \
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f, \
    0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f, \
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f, 0x1.5a3d7p-4f, \
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f, \
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f, \
    0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f, \
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f, \
    0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f, \
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f, \
    0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f, \
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f, \
    0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f, \
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f, \
    0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f, \
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f}

#define FO_DYNAMIC_MAP_UNSIGNED \
    {0x0p+0f, 0x1.5cf754p-22f, 0x1.a0133p-21f, 0x1.1d367p-19f, 0x1.2599ecp-18f, 0x1.bc98a2p-18f, \
    0x1.29cbaap-17f, 0x1.0624dcp-16f, 0x1.c2e34p-16f, 0x1.3fd0dp-15f, 0x1.9e3p-15f, 0x1.fc8f34p-15f, \
    0x1.2d7732p-14f, 0x1.5ca6c8p-14f, 0x1.8bd662p-14f, 0x1.0cb296p-13f, 0x1.82a994p-13f, 0x1.f8a092p-13f, \
    0x1.374bc8p-12f, 0x1.724744p-12f, 0x1.ad42c6p-12f, 0x1.e83e44p-12f, 0x1.119ce2p-11f, 0x1.2f1aap-11f, \
    0x1.4c986p-11f, 0x1.6a162p-11f, 0x1.8793dep-11f, 0x1.a511ap-11f, 0x1.c28f5ep-11f, 0x1.e00d1cp-11f, \
    0x1.fd8adcp-11f, 0x1.2b020cp-10f, 0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041894p-9f, 0x1.28f5c2p-9f, \
    0x1.4dd2fp-9f, 0x1.72b02p-9f, 0x1.978d4ep-9f, 0x1.bc6a8p-9f, 0x1.e147aep-9f, 0x1.03126ep-8f, \
    0x1.158104p-8f, 0x1.27ef9ep-8f, 0x1.3a5e34p-8f, 0x1.4cccccp-8f, 0x1.5f3b64p-8f, 0x1.71a9fap-8f, \
    0x1.841894p-8f, 0x1.96872ap-8f, 0x1.a8f5c2p-8f, 0x1.bb645cp-8f, 0x1.cdd2fp-8f, 0x1.e0418ap-8f, \
    0x1.f2b01ep-8f, 0x1.028f5cp-7f, 0x1.0bc6a8p-7f, 0x1.14fdf2p-7f, 0x1.1e354p-7f, 0x1.276c8ap-7f, \
    0x1.30a3d6p-7f, 0x1.39db24p-7f, 0x1.43126ep-7f, 0x1.5eb854p-7f, 0x1.8ccccep-7f, 0x1.bae146p-7f, \
    0x1.e8f5c4p-7f, 0x1.0b851ep-6f, 0x1.228f5ep-6f, 0x1.39999ap-6f, 0x1.50a3d6p-6f, 0x1.67ae16p-6f, \
    0x1.7eb852p-6f, 0x1.95c28ep-6f, 0x1.accccep-6f, 0x1.c3d70ep-6f, 0x1.dae146p-6f, 0x1.f1eb86p-6f, \
    0x1.047aep-5f, 0x1.1p-5f, 0x1.1b851ep-5f, 0x1.270a3ep-5f, 0x1.328f5ep-5f, 0x1.3e147ap-5f, \
    0x1.49999ap-5f, 0x1.551eb8p-5f, 0x1.60a3d6p-5f, 0x1.6c28f6p-5f, 0x1.77ae14p-5f, 0x1.833334p-5f, \
    0x1.8eb85p-5f, 0x1.9a3d7p-5f, 0x1.a5c28ep-5f, 0x1.b147aep-5f, 0x1.bccccep-5f, 0x1.c851eep-5f, \
    0x1.d3d70ep-5f, 0x1.df5c2ap-5f, 0x1.eae146p-5f, 0x1.f66666p-5f, 0x1.00f5c4p-4f, 0x1.06b854p-4f, \
    0x1.0c7ae2p-4f, 0x1.123d7p-4f, 0x1.18p-4f, 0x1.1dc29p-4f, 0x1.23852p-4f, 0x1.2947aep-4f, \
    0x1.2f0a3ep-4f, 0x1.34cccep-4f, 0x1.3a8f5ep-4f, 0x1.4051ecp-4f, 0x1.46147cp-4f, 0x1.4bd70ap-4f, \
    0x1.51999ap-4f, 0x1.575c2ap-4f, 0x1.5d1eb8p-4f, 0x1.62e148p-4f, 0x1.68a3d6p-4f, 0x1.6e6666p-4f, \
    0x1.7428f6p-4f, 0x1.79eb86p-4f, 0x1.7fae16p-4f, 0x1.8570a4p-4f, 0x1.8b3334p-4f, 0x1.90f5c4p-4f, \
    0x1.96b852p-4f, 0x1.a8p-4f, 0x1.c4ccccp-4f, 0x1.e1999ap-4f, 0x1.fe6666p-4f, 0x1.0d9998p-3f, \
    0x1.1cp-3f, 0x1.2a6668p-3f, 0x1.38ccccp-3f, 0x1.473334p-3f, 0x1.559998p-3f, 0x1.64p-3f, \
    0x1.726668p-3f, 0x1.80ccccp-3f, 0x1.8f3334p-3f, 0x1.9d9998p-3f, 0x1.acp-3f, 0x1.ba6668p-3f, \
    0x1.c8ccccp-3f, 0x1.d73334p-3f, 0x1.e59998p-3f, 0x1.f4p-3f, 0x1.013332p-2f, 0x1.086666p-2f, \
    0x1.0f999ap-2f, 0x1.16ccccp-2f, 0x1.1ep-2f, 0x1.253334p-2f, 0x1.2c6666p-2f, 0x1.339998p-2f, \
    0x1.3accccp-2f, 0x1.42p-2f, 0x1.493334p-2f, 0x1.506666p-2f, 0x1.579998p-2f, 0x1.5eccccp-2f, \
    0x1.66p-2f, 0x1.6d3334p-2f, 0x1.746666p-2f, 0x1.7b9998p-2f, 0x1.82ccccp-2f, 0x1.8ap-2f, \
    0x1.913334p-2f, 0x1.986666p-2f, 0x1.9f9998p-2f, 0x1.a6ccccp-2f, 0x1.aep-2f, 0x1.b53334p-2f, \
    0x1.bc6666p-2f, 0x1.c39998p-2f, 0x1.caccccp-2f, 0x1.d2p-2f, 0x1.d93334p-2f, 0x1.e06666p-2f, \
    0x1.e79998p-2f, 0x1.eeccccp-2f, 0x1.f6p-2f, 0x1.fd3332p-2f, 0x1.023334p-1f, 0x1.05ccccp-1f, \
    0x1.096666p-1f, 0x1.0dp-1f, 0x1.109998p-1f, 0x1.143334p-1f, 0x1.17ccccp-1f, 0x1.1b6668p-1f, \
    0x1.1fp-1f, 0x1.22999ap-1f, 0x1.263334p-1f, 0x1.29ccccp-1f, 0x1.2d6668p-1f, 0x1.31p-1f, \
    0x1.34999ap-1f, 0x1.383334p-1f, 0x1.3bccccp-1f, 0x1.3f6668p-1f, 0x1.43p-1f, 0x1.46999ap-1f, \
    0x1.4a3334p-1f, 0x1.4dccccp-1f, 0x1.516668p-1f, 0x1.55p-1f, 0x1.58999ap-1f, 0x1.5c3334p-1f, \
    0x1.5fccccp-1f, 0x1.636668p-1f, 0x1.67p-1f, 0x1.6a999ap-1f, 0x1.6e3334p-1f, 0x1.71ccccp-1f, \
    0x1.756668p-1f, 0x1.79p-1f, 0x1.7c999ap-1f, 0x1.803334p-1f, 0x1.83ccccp-1f, 0x1.876668p-1f, \
    0x1.8bp-1f, 0x1.8e9998p-1f, 0x1.923334p-1f, 0x1.95ccccp-1f, 0x1.996668p-1f, 0x1.9dp-1f, \
    0x1.a09998p-1f, 0x1.a43334p-1f, 0x1.a7ccccp-1f, 0x1.ab6668p-1f, 0x1.afp-1f, 0x1.b29998p-1f, \
    0x1.b63334p-1f, 0x1.b9ccccp-1f, 0x1.bd6668p-1f, 0x1.c1p-1f, 0x1.c49998p-1f, 0x1.c83334p-1f, \
    0x1.cbccccp-1f, 0x1.cf6668p-1f, 0x1.d3p-1f, 0x1.d69998p-1f, 0x1.da3334p-1f, 0x1.ddccccp-1f, \
    0x1.e16668p-1f, 0x1.e5p-1f, 0x1.e89998p-1f, 0x1.ec3334p-1f, 0x1.efccccp-1f, 0x1.f36668p-1f, \
    0x1.f7p-1f, 0x1.fa9998p-1f, 0x1.fe3334p-1f, 0x1p+0f}

namespace fo {

// -------------------------------------------------------------------------------------------
// float <-> bits, and the float operations of the 8-bit helpers (IEEE on the device whatever the
// compile options: explicitly rounded PTX, ordered comparisons without .ftz).

FO_STORAGE_HD unsigned int float32_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    unsigned int u;
    __builtin_memcpy(&u, &x, sizeof u);
    return u;
#endif
}

FO_STORAGE_HD float bits_float32(unsigned int u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

#if defined(__CUDA_ARCH__)
#define FO_STORAGE_BINOP(NAME, PTX)                              \
    FO_STORAGE_HD float NAME(float a, float b) {                 \
        float r;                                                 \
        asm(PTX " %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));      \
        return r;                                                \
    }
#define FO_STORAGE_CMP(NAME, PTX)                                \
    FO_STORAGE_HD bool NAME(float a, float b) {                  \
        unsigned r;                                              \
        asm("{\n\t.reg .pred fo_p;\n\t" PTX " fo_p, %1, %2;\n\t" \
            "selp.u32 %0, 1, 0, fo_p;\n\t}"                      \
            : "=r"(r) : "f"(a), "f"(b));                         \
        return r != 0u;                                          \
    }
#else
#define FO_STORAGE_BINOP(NAME, PTX) \
    FO_STORAGE_HD float NAME(float a, float b) { return a PTX b; }
#define FO_STORAGE_CMP(NAME, PTX) \
    FO_STORAGE_HD bool NAME(float a, float b) { return a PTX b; }
#endif

#if defined(__CUDA_ARCH__)
FO_STORAGE_BINOP(st_add, "add.rn.f32")
FO_STORAGE_BINOP(st_mul, "mul.rn.f32")
FO_STORAGE_BINOP(st_div, "div.rn.f32")
FO_STORAGE_CMP(st_gt, "setp.gt.f32")
FO_STORAGE_CMP(st_lt, "setp.lt.f32")
FO_STORAGE_CMP(st_le, "setp.le.f32")
#else
FO_STORAGE_BINOP(st_add, +)
FO_STORAGE_BINOP(st_mul, *)
FO_STORAGE_BINOP(st_div, /)
FO_STORAGE_CMP(st_gt, >)
FO_STORAGE_CMP(st_lt, <)
FO_STORAGE_CMP(st_le, <=)
#endif

#undef FO_STORAGE_BINOP
#undef FO_STORAGE_CMP

// |x| by clearing the sign bit (exact, no flush).
FO_STORAGE_HD float st_abs(float x) { return bits_float32(float32_bits(x) & 0x7FFFFFFFu); }

// -------------------------------------------------------------------------------------------
// bfloat16

FO_STORAGE_HD float bf16_to_f32(unsigned short bits) { return bits_float32((unsigned int)bits << 16); }

FO_STORAGE_HD unsigned short bf16_nan(unsigned int u) {
    return (unsigned short)(((u >> 16) & 0x8000u) | 0x7FC0u);
}

FO_STORAGE_HD unsigned short f32_to_bf16_rne(float x) {
    const unsigned int u = float32_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        return bf16_nan(u);
    }
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

FO_STORAGE_HD unsigned short f32_to_bf16_sr(float x, unsigned int rbits) {
    const unsigned int u = float32_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        return bf16_nan(u);
    }
    return (unsigned short)((u + (rbits & 0xFFFFu)) >> 16);
}

// -------------------------------------------------------------------------------------------
// float16 (IEEE binary16)

FO_STORAGE_HD float f16_to_f32(unsigned short bits) {
    const unsigned int h = bits;
    const unsigned int sign = (h & 0x8000u) << 16;
    int exponent = (int)((h >> 10) & 0x1Fu);
    unsigned int mantissa = h & 0x3FFu;
    if (exponent == 0x1F) {
        return bits_float32(sign | 0x7F800000u | (mantissa << 13));
    }
    if (exponent == 0) {
        if (mantissa == 0u) {
            return bits_float32(sign);
        }
        exponent = 1;
        while ((mantissa & 0x400u) == 0u) {
            mantissa <<= 1;
            exponent -= 1;
        }
        mantissa &= 0x3FFu;
    }
    return bits_float32(sign | ((unsigned int)(exponent + 112) << 23) | (mantissa << 13));
}

FO_STORAGE_HD unsigned short f16_nan(unsigned int u) {
    unsigned int h = (u >> 13) & 0x3FFu;
    if (h == 0u) {
        h = 1u;
    }
    return (unsigned short)(((u >> 16) & 0x8000u) | 0x7C00u | h);
}

FO_STORAGE_HD unsigned short f32_to_f16_rne(float x) {
    const unsigned int u = float32_bits(x);
    const unsigned int sign = (u >> 16) & 0x8000u;
    const unsigned int a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) {
        return f16_nan(u);
    }
    if (a >= 0x477FF000u) {
        return (unsigned short)(sign | 0x7C00u);
    }
    if (a >= 0x38800000u) {
        unsigned int h = (a - 0x38000000u) >> 13;
        const unsigned int rest = a & 0x1FFFu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) == 1u)) {
            h += 1u;
        }
        return (unsigned short)(sign | h);
    }
    if (a <= 0x33000000u) {
        return (unsigned short)sign;
    }
    const unsigned int shift = 126u - (a >> 23);
    const unsigned int mant = (a & 0x7FFFFFu) | 0x800000u;
    unsigned int h = mant >> shift;
    const unsigned int rest = mant & ((1u << shift) - 1u);
    const unsigned int half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (h & 1u) == 1u)) {
        h += 1u;
    }
    return (unsigned short)(sign | h);
}

FO_STORAGE_HD unsigned short f32_to_f16_sr(float x, unsigned int rbits) {
    const unsigned int u = float32_bits(x);
    const unsigned int sign = (u >> 16) & 0x8000u;
    const unsigned int a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) {
        return f16_nan(u);
    }
    if (a >= 0x47800000u) {
        return (unsigned short)(sign | 0x7C00u);
    }
    if (a >= 0x38800000u) {
        return (unsigned short)(sign | ((a - 0x38000000u + (rbits & 0x1FFFu)) >> 13));
    }
    unsigned int e = a >> 23;
    unsigned long long mant;
    if (e == 0u) {
        e = 1u;
        mant = a & 0x7FFFFFu;
    } else {
        mant = (a & 0x7FFFFFu) | 0x800000u;
    }
    unsigned int shift = 126u - e;
    if (shift >= 56u) {
        return (unsigned short)sign;
    }
    if (shift > 32u) {
        mant >>= shift - 32u;
        shift = 32u;
    }
    const unsigned long long mask = (1ull << shift) - 1ull;
    return (unsigned short)(sign | (unsigned int)((mant + (rbits & mask)) >> shift));
}

// -------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC 2011; Random123's philox4x32, cuRAND's Philox4_32_10).

struct Philox4 {
    unsigned int v[4];
};

FO_STORAGE_HD Philox4 philox4x32_10(unsigned int c0, unsigned int c1, unsigned int c2,
                                    unsigned int c3, unsigned int k0, unsigned int k1) {
    for (int round = 0; round < 10; ++round) {
        const unsigned long long p0 = (unsigned long long)c0 * 0xD2511F53u;
        const unsigned long long p1 = (unsigned long long)c2 * 0xCD9E8D57u;
        const unsigned int hi0 = (unsigned int)(p0 >> 32), lo0 = (unsigned int)p0;
        const unsigned int hi1 = (unsigned int)(p1 >> 32), lo1 = (unsigned int)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    Philox4 out;
    out.v[0] = c0;
    out.v[1] = c1;
    out.v[2] = c2;
    out.v[3] = c3;
    return out;
}

// Counter (index low, index high, step low, step high), key (seed low, seed high).
FO_STORAGE_HD Philox4 random_bits4(unsigned long long seed, unsigned long long step,
                                   unsigned long long index) {
    return philox4x32_10((unsigned int)index, (unsigned int)(index >> 32), (unsigned int)step,
                         (unsigned int)(step >> 32), (unsigned int)seed,
                         (unsigned int)(seed >> 32));
}

FO_STORAGE_HD unsigned int random_bits(unsigned long long seed, unsigned long long step,
                                       unsigned long long index) {
    return random_bits4(seed, step, index).v[0];
}

// -------------------------------------------------------------------------------------------
// 8-bit blockwise state: codes into a sorted 256-entry map, scaled by the block's absmax.

FO_STORAGE_HD float dequantize(unsigned char code, float absmax, const float* qmap) {
    return st_mul(qmap[code], absmax);
}

// Nearest entry, ties to the even code: bitsandbytes' dQuantize<0> (see storage.quantize).
FO_STORAGE_HD unsigned char quantize(float xn, const float* qmap) {
    int r = 0;
    for (int step = 128; step > 0; step >>= 1) {
        if (st_lt(qmap[r + step - 1], xn)) {
            r += step;
        }
    }
    if (r == 0) {
        return 0;
    }
    const float mid = st_mul(st_add(qmap[r - 1], qmap[r]), 0.5f);
    if (st_gt(xn, mid)) {
        return (unsigned char)r;
    }
    if (st_lt(xn, mid)) {
        return (unsigned char)(r - 1);
    }
    return (unsigned char)(r - (r & 1));
}

FO_STORAGE_HD unsigned char quantize_value(float x, float absmax, const float* qmap) {
    if (st_gt(absmax, 0.0f)) {
        return quantize(st_div(x, absmax), qmap);
    }
    return quantize(0.0f, qmap);
}

// max(m, |x|), NaN from either side propagates (storage.absmax_update).
FO_STORAGE_HD float absmax_update(float m, float x) {
    const float a = st_abs(x);
    if (st_gt(a, m)) {
        return a;
    }
    if (st_le(a, m)) {
        return m;
    }
    return st_add(m, a);
}

FO_STORAGE_HD float block_absmax(const float* a, long long start, long long stop) {
    float m = 0.0f;
    for (long long i = start; i < stop; ++i) {
        m = absmax_update(m, a[i]);
    }
    return m;
}

}  // namespace fo

#endif  // FASTOPT_STORAGE_CUH
