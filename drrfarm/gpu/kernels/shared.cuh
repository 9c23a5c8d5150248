// What drrfarm's CUDA kernels share (drrfarm/render/kernels/drr.cu, mesh.cu, drrfarm/scatter/scatter.cu):
// integer types, float64 infinity, the Philox4x32-10 counter-based generator and its uniforms, and the
// pixel a thread of a (detector x, detector y, image) grid works on.  No CUDA headers beyond what
// nvcc/NVRTC provide implicitly.  Included through the build's include path (drrfarm.gpu.build).
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

#define INV_2_32 2.3283064365386963e-10  // 2^-32

// +infinity in float64 (no math header).
__device__ __forceinline__ double inf64() { return __longlong_as_double(0x7ff0000000000000LL); }

// ---------------------------------------------------------------------------------- Philox4x32-10

// Philox4x32-10 (Salmon et al., SC'11): four output words for counter c and key k
// (the NumPy twin: drrfarm.scatter.philox.philox4x32_10).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const u32 lo0 = 0xD2511F53u * c.x;
        const u32 hi0 = __umulhi(0xD2511F53u, c.x);
        const u32 lo1 = 0xCD9E8D57u * c.z;
        const u32 hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

// An output word as a uniform in the open interval (0, 1).
__device__ __forceinline__ double open_uniform(u32 w) { return ((double)w + 0.5) * INV_2_32; }

// ---------------------------------------------------------------------------------- the thread's pixel

// Declares this thread's pixel (u, v) of image b: grid x and y run over the detector, z over the images of a
// batch.  A macro rather than a function returning a struct: the kernels compile to the same code as before.
#define THREAD_PIXEL(u, v, b)                              \
    const int u = blockIdx.x * blockDim.x + threadIdx.x; \
    const int v = blockIdx.y * blockDim.y + threadIdx.y; \
    const int b = blockIdx.z

// True for the threads of a partial block that lie off the W x H detector.
__device__ __forceinline__ bool off_detector(int u, int v, int W, int H) { return u >= W || v >= H; }
