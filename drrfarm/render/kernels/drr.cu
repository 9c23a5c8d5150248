// drrfarm CUDA kernels: the GPU twin of drrfarm/render/reference.py + drrfarm/physics.py.
//
// One thread renders one detector pixel of one image: ray set-up from the camera (float64), clipping to
// the volume's box [-0.5, n-0.5]^3 and to t in [0, t_detector], per-material line integrals by
// Joseph slice stepping or a uniform midpoint trilinear march (same sample points as the reference),
// then the polyenergetic detector model, solid-angle fall-off, Philox4x32-10 noise, the output transform
// and the cast to the stored type.  Either in one kernel (drr_<method>_*) or split in three
// (drr_rays_<method> -> drr_march_<method>_* -> drr_finish_m*), the default: the march kernel then
// needs few registers, and the occupancy that buys hides the texture latency.  No CUDA headers beyond
// what nvcc/NVRTC provide implicitly (texture-object fetches); no curand (Philox4x32-10 of
// drrfarm/gpu/kernels/shared.cuh), no cuda_fp16.h (inline PTX for fp16).
//
// Volumes live in layered 2D textures of half-float texels (C = 1, 2 or 4 channels; NT = 2 textures
// for 5..8 materials).  Layout for slice axis a (0 = i, 1 = j, 2 = k): layer = index along a,
// texture y = the smaller remaining axis, texture x = the larger one:
//   a = 0: layer i, y = j, x = k;   a = 1: layer j, y = i, x = k;   a = 2: layer k, y = i, x = j.
// Joseph takes one bilinear fetch per crossed slice from the layout of the ray's dominant axis;
// the trilinear march takes two bilinear fetches (adjacent layers) and interpolates between them
// with an fp32 weight.

#include "params.cuh"  // DrrParams and its record strides; shared.cuh: Philox4x32-10, THREAD_PIXEL

#ifndef DRR_MIN_BLOCKS
#define DRR_MIN_BLOCKS 1  // __launch_bounds__ minimum resident blocks of 256 threads (register cap)
#endif

#ifndef DRR_UNROLL
#define DRR_UNROLL 8  // unroll of the slice loop (independent texture fetches in flight per thread)
#endif
#ifndef DRR_UNROLL_C4
#define DRR_UNROLL_C4 2  // the same for 2- and 4-channel texels (more registers per fetch)
#endif
constexpr int kSliceUnroll = DRR_UNROLL;
constexpr int kSliceUnrollC4 = DRR_UNROLL_C4;

#define NEGLOG_EPS 0.01f

enum { MODE_LINE_INTEGRALS = 0, MODE_IMAGE = 1 };
enum { OUT_LINE_INTEGRAL = 0, OUT_TRANSMISSION = 1, OUT_INTENSITY = 2, OUT_NEGLOG = 3 };
enum { DT_F32 = 0, DT_F16 = 1, DT_U16 = 2 };

// ------------------------------------------------------------------------------------------------ helpers

__device__ __forceinline__ u16 f32_to_f16_bits(float v) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ void store_output(const DrrParams& p, size_t idx, float y) {
    if (p.out_dtype == DT_F32) {
        reinterpret_cast<float*>(p.out)[idx] = y;
    } else if (p.out_dtype == DT_F16) {
        reinterpret_cast<u16*>(p.out)[idx] = f32_to_f16_bits(y);
    } else {
        // float64 division and round-half-even, then the clip: bit for bit what the CPU quantiser
        // (drrfarm.sinks.writer.quantize) makes of the float32 value y
        double r = rint((double)y / p.scale64);
        r = fmin(fmax(r, 0.0), 65535.0);  // NaN -> 0
        reinterpret_cast<u16*>(p.out)[idx] = (u16)r;
    }
}

// ---------------------------------------------------------------------------------- random numbers

// Counter-based stream for one pixel: counter = (pixel, block, purpose, 0), key = 64-bit seed.
struct Rng {
    uint4 ctr;
    uint2 key;
    uint4 buf;
    int used;
    __device__ __forceinline__ Rng(u32 pixel, u32 purpose, u32 seed_lo, u32 seed_hi) {
        ctr = make_uint4(pixel, 0u, purpose, 0u);
        key = make_uint2(seed_lo, seed_hi);
        used = 4;
    }
    __device__ __forceinline__ u32 next() {
        if (used == 4) {
            buf = philox4x32_10(ctr, key);
            ctr.y += 1u;
            used = 0;
        }
        const u32 r = used == 0 ? buf.x : used == 1 ? buf.y : used == 2 ? buf.z : buf.w;
        ++used;
        return r;
    }
    // Uniform in the open interval (0, 1).
    __device__ __forceinline__ double uniform() { return open_uniform(next()); }
};

// Exact Poisson sampler: multiplication (Knuth) below lambda 10, Hoermann's PTRS
// (transformed rejection with squeeze) above.  All in float64.
__device__ double poisson(Rng& g, double lam) {
    if (!(lam > 0.0)) return 0.0;
    if (lam < 10.0) {
        const double L = exp(-lam);
        double prod = 1.0;
        double k = 0.0;
        while (true) {
            prod *= g.uniform();
            if (prod <= L) return k;
            k += 1.0;
        }
    }
    const double slam = sqrt(lam);
    const double loglam = log(lam);
    const double b = 0.931 + 2.53 * slam;
    const double a = -0.059 + 0.02483 * b;
    const double inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
    const double vr = 0.9277 - 3.6224 / (b - 2.0);
    while (true) {
        const double U = g.uniform() - 0.5;
        const double V = g.uniform();
        const double us = 0.5 - fabs(U);
        const double k = floor((2.0 * a / us + b) * U + lam + 0.43);
        if (us >= 0.07 && V <= vr && k >= 0.0) return k;
        if (k < 0.0 || (us < 0.013 && V > us)) continue;
        if (log(V) + log(inv_alpha) - log(a / (us * us) + b) <= -lam + k * loglam - lgamma(k + 1.0)) return k;
    }
}

__device__ __forceinline__ float std_normal(Rng& g) {
    const double u1 = g.uniform();
    const double u2 = g.uniform();
    float s, c;
    sincospif(2.0f * (float)u2, &s, &c);
    return sqrtf(-2.0f * logf((float)u1)) * c;
}

// ------------------------------------------------------------------------------------- the image of a thread

// Image b's info words (DRR_INFO_STRIDE u32) and camera record (DRR_CAM_STRIDE doubles).
#define IMAGE_INFO(p, b) (reinterpret_cast<const u32*>((p).info) + DRR_INFO_STRIDE * (b))
#define IMAGE_CAMERA(p, b) (reinterpret_cast<const double*>((p).cams) + DRR_CAM_STRIDE * (b))

// This image's spectrum tables (p.tstride floats) -> shared memory ``sh``, by the whole block.
#define LOAD_TABLES(p, info, sh)                                                                        \
    do {                                                                                                \
        const float* tb = reinterpret_cast<const float*>((p).tables) + (size_t)(info)[0] * (p).tstride; \
        const int tid = threadIdx.y * blockDim.x + threadIdx.x;                                        \
        for (int i = tid; i < (p).tstride; i += blockDim.x * blockDim.y) (sh)[i] = tb[i];              \
        __syncthreads();                                                                                \
    } while (0)

// ------------------------------------------------------------------------------------- sampling

// acc[0..C) += w * bilinear(tex at (x, y) in texture coordinates, layer)
template <int C>
__device__ __forceinline__ void fetch_add(u64 tex, float x, float y, int layer, float w, float* acc) {
    if (C == 1) {
        const float v = tex2DLayered<float>(tex, x, y, layer);
        acc[0] = fmaf(w, v, acc[0]);
    } else if (C == 2) {
        const float2 v = tex2DLayered<float2>(tex, x, y, layer);
        acc[0] = fmaf(w, v.x, acc[0]);
        acc[1] = fmaf(w, v.y, acc[1]);
    } else {
        const float4 v = tex2DLayered<float4>(tex, x, y, layer);
        acc[0] = fmaf(w, v.x, acc[0]);
        acc[1] = fmaf(w, v.y, acc[1]);
        acc[2] = fmaf(w, v.z, acc[2]);
        acc[3] = fmaf(w, v.w, acc[3]);
    }
}

template <int C>
__device__ __forceinline__ void point_add(u64 tex, int x, int y, int layer, float w, float* acc) {
    fetch_add<C>(tex, (float)x + 0.5f, (float)y + 0.5f, layer, w, acc);
}

// Bilinear sample at index coordinates (x, y) (voxel centres at integers), clamped to the edge voxels.
// EXACT = 0: the texture unit's filter (8-bit fractional weights); EXACT = 1: four point fetches and
// fp32 weights (the reference's arithmetic).
template <int C, int NT, int EXACT>
__device__ __forceinline__ void sample_add(const u64* tl, const u64* tp, float x, float y, int layer, float w,
                                           int nx, int ny, float* acc) {
    if (!EXACT) {
#pragma unroll
        for (int t = 0; t < NT; ++t) fetch_add<C>(tl[t], x + 0.5f, y + 0.5f, layer, w, acc + 4 * t);
    } else {
        const float xc = fminf(fmaxf(x, 0.0f), (float)(nx - 1));
        const float yc = fminf(fmaxf(y, 0.0f), (float)(ny - 1));
        const float x0f = floorf(xc), y0f = floorf(yc);
        const float fx = xc - x0f, fy = yc - y0f;
        const int x0 = (int)x0f, y0 = (int)y0f;
        const int x1 = min(x0 + 1, nx - 1), y1 = min(y0 + 1, ny - 1);
        const float w00 = w * (1.0f - fx) * (1.0f - fy), w10 = w * fx * (1.0f - fy);
        const float w01 = w * (1.0f - fx) * fy, w11 = w * fx * fy;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            point_add<C>(tp[t], x0, y0, layer, w00, acc + 4 * t);
            point_add<C>(tp[t], x1, y0, layer, w10, acc + 4 * t);
            point_add<C>(tp[t], x0, y1, layer, w01, acc + 4 * t);
            point_add<C>(tp[t], x1, y1, layer, w11, acc + 4 * t);
        }
    }
}

__device__ __forceinline__ int layout_x_axis(int a) { return a == 2 ? 1 : 2; }
__device__ __forceinline__ int layout_y_axis(int a) { return a == 0 ? 1 : 0; }

template <typename T>
__device__ __forceinline__ T pick3(int a, T x0, T x1, T x2) { return a == 0 ? x0 : (a == 1 ? x1 : x2); }

// Slab test of one axis against [-0.5, n - 0.5] (reference: clip_rays_to_box).
__device__ __forceinline__ void slab(double s, double d, int n, double& t_near, double& t_far) {
    const double lo = -0.5 - s;
    const double hi = (double)n - 0.5 - s;
    if (d == 0.0) {
        const bool inside = (s > -0.5) && (s < (double)n - 0.5);
        if (!inside) {
            t_near = inf64();
            t_far = -t_near;
        }
    } else {
        const double inv = 1.0 / d;
        const double ta = lo * inv, tb = hi * inv;
        t_near = fmax(t_near, fmin(ta, tb));
        t_far = fmin(t_far, fmax(ta, tb));
    }
}

// Trilinear samples at base + k * step (k = 0..ns-1, index coordinates) from the layered texture of
// slice axis L: a bilinear fetch on the two layers around the L coordinate, blended with an fp32 weight.
template <int C, int NT, int EXACT, int UNROLL>
__device__ __forceinline__ void march_layers(const DrrParams& p, int L, float b0, float b1, float b2, float g0, float g1,
                                             float g2, int ns, float* acc) {
    const int xa = layout_x_axis(L), ya = layout_y_axis(L);
    u64 tl[NT], tp[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        tl[t] = pick3(L, p.tex[t], p.tex[2 + t], p.tex[4 + t]);
        tp[t] = pick3(L, p.texp[t], p.texp[2 + t], p.texp[4 + t]);
    }
    const float bx = pick3(xa, b0, b1, b2), by = pick3(ya, b0, b1, b2), bl = pick3(L, b0, b1, b2);
    const float sx = pick3(xa, g0, g1, g2), sy = pick3(ya, g0, g1, g2), sl = pick3(L, g0, g1, g2);
    const int nx = pick3(xa, p.nI, p.nJ, p.nK), ny = pick3(ya, p.nI, p.nJ, p.nK);
    const int nl = pick3(L, p.nI, p.nJ, p.nK);
    const float lmax = (float)(nl - 1);
#pragma unroll UNROLL
    for (int k = 0; k < ns; ++k) {
        const float fk = (float)k;
        const float x = fmaf(fk, sx, bx), y = fmaf(fk, sy, by);
        const float pl = fminf(fmaxf(fmaf(fk, sl, bl), 0.0f), lmax);
        const float l0f = floorf(pl);
        const float w = pl - l0f;
        const int l0 = (int)l0f;
        const int l1 = min(l0 + 1, nl - 1);
        sample_add<C, NT, EXACT>(tl, tp, x, y, l0, 1.0f - w, nx, ny, acc);
        sample_add<C, NT, EXACT>(tl, tp, x, y, l1, w, nx, ny, acc);
    }
}


// Scatter tally (signal, counts) of image b at pixel (u, v): bilinear between bin centres, constant beyond
// the outer ones (drrfarm.scatter.fast.upsample_bilinear).
__device__ __forceinline__ float scatter_axis(int x, int n_out, int n_in, int& i0, int& i1) {
    const float c = fminf(fmaxf(((float)x + 0.5f) * ((float)n_in / (float)n_out) - 0.5f, 0.0f), (float)(n_in - 1));
    i0 = min((int)floorf(c), max(n_in - 2, 0));
    i1 = min(i0 + 1, n_in - 1);
    return c - (float)i0;
}

__device__ __forceinline__ void scatter_at(const DrrParams& p, int u, int v, int b, float& sig, float& cnt) {
    int u0, u1, v0, v1;
    const float wu = scatter_axis(u, p.W, p.scatter_w, u0, u1);
    const float wv = scatter_axis(v, p.H, p.scatter_h, v0, v1);
    const size_t plane = (size_t)p.scatter_h * p.scatter_w;
    const float* t = reinterpret_cast<const float*>(p.scatter) + (size_t)b * 2 * plane;
    float out[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const float* g = t + c * plane;
        const float top = g[v0 * p.scatter_w + u0] * (1.0f - wu) + g[v0 * p.scatter_w + u1] * wu;
        const float bot = g[v1 * p.scatter_w + u0] * (1.0f - wu) + g[v1 * p.scatter_w + u1] * wu;
        out[c] = top * (1.0f - wv) + bot * wv;
    }
    sig = out[0];
    cnt = out[1];
}

// Detector model, fall-off, noise, output transform and cast for one pixel (physics.finish_image).
// ``sh``: this image's spectrum tables in shared memory; ``A``: the pixel's material line integrals.
template <int MAXM>
__device__ __forceinline__ void finish_pixel(const DrrParams& p, const float* sh, const double* cam, const u32* info,
                                             int u, int v, int b, const float* A) {
    const double pu = (double)u, pv = (double)v;
    const size_t pix = (size_t)v * p.W + u;
    // ---- polyenergetic detector model (physics.transmissions)
    const int nb = (int)sh[0];
    const float S0 = sh[1];
    const float* w_sig = sh + 2;
    const float* w_cnt = sh + 2 + p.nbmax;
    const float* mu = sh + 2 + 2 * p.nbmax;
    float tau = 0.0f, q = 0.0f;
    for (int e = 0; e < nb; ++e) {
        float ex = 0.0f;
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (m < p.M) ex = fmaf(mu[e * p.M + m], A[m], ex);
        const float T = expf(-ex);
        tau = fmaf(w_sig[e], T, tau);
        q = fmaf(w_cnt[e], T, q);
    }
    // ---- solid-angle fall-off cos^3
    if (p.solid_angle) {
        const float x = (float)((pu - cam[19]) / cam[18]);
        const float y = (float)((pv - cam[21]) / cam[20]);
        const float r2 = 1.0f + x * x + y * y;
        const float g = 1.0f / (r2 * sqrtf(r2));
        tau *= g;
        q *= g;
    }
    // ---- scatter (drrfarm.scatter), added before the noise
    if (p.scatter) {
        float s_sig, s_cnt;
        scatter_at(p, u, v, b, s_sig, s_cnt);
        tau += s_sig;
        q += s_cnt;
    }
    // ---- noise (physics.apply_noise)
    if (p.photons > 0.0f) {
        const float qs = fmaxf(q, 1e-30f);
        Rng rng((u32)pix, 0x44525246u, info[1], info[2]);
        const double counts = poisson(rng, (double)p.photons * (double)qs);
        float sig = (float)counts * (tau / qs);
        if (p.sigma_e > 0.0f) {
            Rng rng2((u32)pix, 0x4e4f4953u, info[1], info[2]);
            sig = fmaf(p.sigma_e, std_normal(rng2), sig);
        }
        tau = sig / p.photons;
    }
    // ---- output transform (physics.output_transform)
    const size_t idx = (size_t)b * p.H * p.W + pix;
    float y;
    if (p.output == OUT_LINE_INTEGRAL) {
        y = -logf(fmaxf(tau, p.tau_min));
    } else if (p.output == OUT_TRANSMISSION) {
        y = tau;
    } else if (p.output == OUT_INTENSITY) {
        y = tau * S0;
    } else {  // neglog: intensity now, normalised by drr_neglog_finish
        const float I = fmaxf(tau, 0.0f) * S0;
        reinterpret_cast<float*>(p.scratch)[idx] = I;
        u32* mm = reinterpret_cast<u32*>(p.minmax) + 2 * b;
        atomicMin(mm, __float_as_uint(I));
        atomicMax(mm + 1, __float_as_uint(I));
        return;
    }
    store_output(p, idx, y);
}

// ------------------------------------------------------------------------------------- the kernel body

enum { METHOD_TRILINEAR = 0, METHOD_JOSEPH = 1 };
enum { RAY_SLICES = 16 };  // Ray::flags: bits 0-1 an axis; RAY_SLICES: one fetch per slice of that axis

// A ray's sampling plan: ns samples at base + k * step (index coordinates), each weighted h mm.
// RAY_SLICES set: sample k lies on slice c0 + k of axis (flags & 3), fetched from that axis' layout;
// otherwise: trilinear samples from the layout of axis (flags & 3).
struct Ray {
    int ns, flags, c0;
    float h;
    float b0, b1, b2, g0, g1, g2;
};

// A pixel's ray in index coordinates (float64): source s, direction d (per world mm of t), and the
// part [t0, t1] (world mm) inside the volume's box and before the detector.
struct RayGeometry {
    double s0, s1, s2, d0, d1, d2, t0, t1;
};

// Reference: camera_rays_ijk and clip_rays_to_box.
__device__ __forceinline__ RayGeometry ray_geometry(const DrrParams& p, const double* cam, int u, int v) {
    RayGeometry g;
    const double pu = (double)u, pv = (double)v;
    const double cx = cam[9] * pu + cam[10] * pv + cam[11];
    const double cy = cam[12] * pv + cam[13];
    const double nrm = sqrt(cx * cx + cy * cy + 1.0);
    g.d0 = (cam[0] * pu + cam[1] * pv + cam[2]) / nrm;
    g.d1 = (cam[3] * pu + cam[4] * pv + cam[5]) / nrm;
    g.d2 = (cam[6] * pu + cam[7] * pv + cam[8]) / nrm;
    g.s0 = cam[14], g.s1 = cam[15], g.s2 = cam[16];
    const double t_det = cam[17] * nrm;
    const double INF = inf64();
    double t_near = -INF, t_far = INF;
    slab(g.s0, g.d0, p.nI, t_near, t_far);
    slab(g.s1, g.d1, p.nJ, t_near, t_far);
    slab(g.s2, g.d2, p.nK, t_near, t_far);
    g.t0 = fmax(t_near, 0.0);
    g.t1 = fmin(t_far, t_det);
    return g;
}

// Dominant index axis of a direction (first maximum, like numpy.argmax): Joseph's slice axis.
__device__ __forceinline__ int dominant_axis(double d0, double d1, double d2) {
    int a = 0;
    if (fabs(d1) > fabs(d0)) a = 1;
    if (fabs(d2) > fabs(pick3(a, d0, d1, d2))) a = 2;
    return a;
}

// Ray set-up in float64 (reference: camera_rays_ijk, clip_rays_to_box and the two methods' sample points).
template <int METHOD>
__device__ __forceinline__ Ray setup_ray(const DrrParams& p, const double* cam, const u32* info, int u, int v) {
    Ray r;
    r.ns = 0;
    r.flags = 0;
    r.c0 = 0;
    r.h = 0.0f;
    r.b0 = r.b1 = r.b2 = r.g0 = r.g1 = r.g2 = 0.0f;
    const RayGeometry geo = ray_geometry(p, cam, u, v);
    const double d0 = geo.d0, d1 = geo.d1, d2 = geo.d2;
    const double s0 = geo.s0, s1 = geo.s1, s2 = geo.s2;
    const double t0 = geo.t0, t1 = geo.t1;
    const int L = (int)info[3];  // the image's always-resident layout (the principal ray's axis)
    r.flags = L;
    if (METHOD == METHOD_JOSEPH) {
        const int a = dominant_axis(d0, d1, d2);
        const double da = pick3(a, d0, d1, d2), sa = pick3(a, s0, s1, s2);
        const double a0 = sa + t0 * da;
        const double a1 = sa + t1 * da;
        const double c_lo = ceil(fmin(a0, a1));
        const double c_hi = floor(fmax(a0, a1));
        r.ns = (t1 > t0) ? max((int)(c_hi - c_lo) + 1, 0) : 0;
        r.h = (float)(1.0 / fabs(da));
        r.c0 = (int)c_lo;
        // sample k sits on the plane ijk_a = c_lo + k: position = base + k * slope (slope_a = 1)
        const double q0 = d0 / da, q1 = d1 / da, q2 = d2 / da;
        r.b0 = a == 0 ? (float)c_lo : (float)(s0 + (c_lo - sa) * q0);
        r.b1 = a == 1 ? (float)c_lo : (float)(s1 + (c_lo - sa) * q1);
        r.b2 = a == 2 ? (float)c_lo : (float)(s2 + (c_lo - sa) * q2);
        r.g0 = a == 0 ? 1.0f : (float)q0;
        r.g1 = a == 1 ? 1.0f : (float)q1;
        r.g2 = a == 2 ? 1.0f : (float)q2;
        // own layout resident: one bilinear fetch per slice; otherwise the same points are sampled
        // trilinearly from layout L (exactly bilinear on the plane, whose coordinate along a is an integer)
        if (pick3(a, p.tex[0], p.tex[2], p.tex[4]) != 0ull) r.flags = a | RAY_SLICES;
    } else {
        const double length = fmax(t1 - t0, 0.0);
        const double nsd = ceil(length / cam[22]);
        r.ns = (int)nsd;
        if (r.ns > 0) {
            const double h = length / nsd;
            r.h = (float)h;
            // midpoints t_k = t0 + (k + 1/2) h: position = (s + (t0 + h/2) d) + k * (h d)
            const double tm = t0 + 0.5 * h;
            r.b0 = (float)(s0 + tm * d0);
            r.b1 = (float)(s1 + tm * d1);
            r.b2 = (float)(s2 + tm * d2);
            r.g0 = (float)(h * d0);
            r.g1 = (float)(h * d1);
            r.g2 = (float)(h * d2);
        }
    }
    return r;
}

// Accumulate a ray's samples into acc[0..MAXM) (densities, before the h/10 weight).
template <int C, int NT, int EXACT, int METHOD>
__device__ __forceinline__ void march_ray(const DrrParams& p, const Ray& r, float* acc) {
    if (r.ns <= 0) return;
    const int a = r.flags & 3;
    if (METHOD == METHOD_TRILINEAR) {
        march_layers<C, NT, EXACT, 2>(p, a, r.b0, r.b1, r.b2, r.g0, r.g1, r.g2, r.ns, acc);
    } else if (r.flags & RAY_SLICES) {
        const int xa = layout_x_axis(a), ya = layout_y_axis(a);
        u64 tl[NT], tp[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            tl[t] = pick3(a, p.tex[t], p.tex[2 + t], p.tex[4 + t]);
            tp[t] = EXACT ? pick3(a, p.texp[t], p.texp[2 + t], p.texp[4 + t]) : 0ull;
        }
        const float bx = pick3(xa, r.b0, r.b1, r.b2), by = pick3(ya, r.b0, r.b1, r.b2);
        const float sx = pick3(xa, r.g0, r.g1, r.g2), sy = pick3(ya, r.g0, r.g1, r.g2);
        const int nx = EXACT ? pick3(xa, p.nI, p.nJ, p.nK) : 0, ny = EXACT ? pick3(ya, p.nI, p.nJ, p.nK) : 0;
        const int c0 = r.c0, ns = r.ns;
        constexpr int kUnroll = (C == 1) ? kSliceUnroll : kSliceUnrollC4;
#pragma unroll kUnroll
        for (int k = 0; k < ns; ++k) {
            const float fk = (float)k;
            sample_add<C, NT, EXACT>(tl, tp, fmaf(fk, sx, bx), fmaf(fk, sy, by), c0 + k, 1.0f, nx, ny, acc);
        }
    } else {  // Joseph ray without its own layout (rare): the same points, trilinearly
        march_layers<C, NT, EXACT, 1>(p, a, r.b0, r.b1, r.b2, r.g0, r.g1, r.g2, r.ns, acc);
    }
}

// Fused: set-up, march and (FUSED) detector/noise/output in one kernel; !FUSED writes line integrals.
template <int C, int NT, int METHOD, int EXACT, bool FUSED>
__device__ __forceinline__ void drr_body(const DrrParams& p) {
    constexpr int MAXM = (NT == 1) ? C : 8;
    extern __shared__ float sh[];
    THREAD_PIXEL(u, v, b);
    const u32* info = IMAGE_INFO(p, b);
    if (FUSED) LOAD_TABLES(p, info, sh);  // this image's spectrum tables -> shared memory
    if (off_detector(u, v, p.W, p.H)) return;
    const double* cam = IMAGE_CAMERA(p, b);
    const Ray r = setup_ray<METHOD>(p, cam, info, u, v);
    float acc[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) acc[m] = 0.0f;
    march_ray<C, NT, EXACT, METHOD>(p, r, acc);
    const float scale_cm = r.h * 0.1f;  // g/cm3 * mm -> g/cm2
    float A[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) A[m] = acc[m] * scale_cm;
    if (!FUSED) {  // line integrals (B, M, H, W) float32
        float* out = reinterpret_cast<float*>(p.out);
        const size_t pix = (size_t)v * p.W + u;
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (m < p.M) out[((size_t)b * p.M + m) * p.H * p.W + pix] = A[m];
        return;
    }
    finish_pixel<MAXM>(p, sh, cam, info, u, v, b, A);
}

#define DRR_KERNEL(name, C, NT, METHOD, EXACT, FUSED)                                    \
    extern "C" __global__ void __launch_bounds__(256, DRR_MIN_BLOCKS) name(const DrrParams p) { \
        drr_body<C, NT, METHOD, EXACT, FUSED>(p);                                             \
    }

// drr_<method>_c<C>_t<NT>_<hw|exact>: fused render (one kernel from camera to stored pixel).
#define DRR_KERNELS(C, NT)                                                              \
    DRR_KERNEL(drr_joseph_c##C##_t##NT##_hw, C, NT, METHOD_JOSEPH, 0, true)             \
    DRR_KERNEL(drr_joseph_c##C##_t##NT##_exact, C, NT, METHOD_JOSEPH, 1, true)          \
    DRR_KERNEL(drr_trilinear_c##C##_t##NT##_hw, C, NT, METHOD_TRILINEAR, 0, true)       \
    DRR_KERNEL(drr_trilinear_c##C##_t##NT##_exact, C, NT, METHOD_TRILINEAR, 1, true)

DRR_KERNELS(1, 1)
DRR_KERNELS(2, 1)
DRR_KERNELS(4, 1)
DRR_KERNELS(4, 2)

// ---- the split pipeline: drr_rays_<method> (records) -> drr_march_* (line integrals) -> drr_finish_m*

#define RAY_WORDS 12  // a Ray record: 3 x float4 per pixel, [image][row][column]

template <int METHOD>
__device__ __forceinline__ void rays_body(const DrrParams& p) {
    THREAD_PIXEL(u, v, b);
    if (off_detector(u, v, p.W, p.H)) return;
    const u32* info = IMAGE_INFO(p, b);
    const double* cam = IMAGE_CAMERA(p, b);
    const Ray r = setup_ray<METHOD>(p, cam, info, u, v);
    float4* rec = reinterpret_cast<float4*>(p.rays) + 3 * (((size_t)b * p.H + v) * p.W + u);
    rec[0] = make_float4(__int_as_float(r.ns), __int_as_float(r.flags), __int_as_float(r.c0), r.h);
    rec[1] = make_float4(r.b0, r.b1, r.b2, 0.0f);
    rec[2] = make_float4(r.g0, r.g1, r.g2, 0.0f);
}

extern "C" __global__ void __launch_bounds__(256) drr_rays_joseph(const DrrParams p) { rays_body<METHOD_JOSEPH>(p); }
extern "C" __global__ void __launch_bounds__(256) drr_rays_trilinear(const DrrParams p) {
    rays_body<METHOD_TRILINEAR>(p);
}

template <int C, int NT, int EXACT, int METHOD>
__device__ __forceinline__ void march_body(const DrrParams& p) {
    constexpr int MAXM = (NT == 1) ? C : 8;
    THREAD_PIXEL(u, v, b);
    if (off_detector(u, v, p.W, p.H)) return;
    const size_t pix = (size_t)v * p.W + u;
    const float4* rec = reinterpret_cast<const float4*>(p.rays) + 3 * ((size_t)b * p.H * p.W + pix);
    const float4 r0 = rec[0], r1 = rec[1], r2 = rec[2];
    Ray r;
    r.ns = __float_as_int(r0.x);
    r.flags = __float_as_int(r0.y);
    r.c0 = __float_as_int(r0.z);
    r.h = r0.w;
    r.b0 = r1.x, r.b1 = r1.y, r.b2 = r1.z;
    r.g0 = r2.x, r.g1 = r2.y, r.g2 = r2.z;
    float acc[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) acc[m] = 0.0f;
    march_ray<C, NT, EXACT, METHOD>(p, r, acc);
    const float scale_cm = r.h * 0.1f;
    float* out = reinterpret_cast<float*>(p.out);
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
        if (m < p.M) out[((size_t)b * p.M + m) * p.H * p.W + pix] = acc[m] * scale_cm;
}

#ifndef DRR_MARCH_MIN_BLOCKS_C1
#define DRR_MARCH_MIN_BLOCKS_C1 8
#endif
#ifndef DRR_MARCH_MIN_BLOCKS_C2
#define DRR_MARCH_MIN_BLOCKS_C2 8
#endif
#ifndef DRR_MARCH_MIN_BLOCKS_C4
#define DRR_MARCH_MIN_BLOCKS_C4 8
#endif

// drr_march_<method>_c<C>_t<NT>_<hw|exact>: line integrals (B, M, H, W) from Ray records.
#define MARCH_KERNEL(M, METHOD, C, NT, MINB)                                                         \
    extern "C" __global__ void __launch_bounds__(256, MINB) drr_march_##M##_c##C##_t##NT##_hw(const DrrParams p) { \
        march_body<C, NT, 0, METHOD>(p);                                                                 \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) drr_march_##M##_c##C##_t##NT##_exact(const DrrParams p) {   \
        march_body<C, NT, 1, METHOD>(p);                                                                 \
    }

// Minimum resident blocks (register caps) and unrolls: measured on an H100 (benchmarks/RESULTS.md,
// 1024² AP, batch 16): 8 blocks / unroll 8 for 1-2 channels; 8 blocks / unroll 2 for half4 texels
// (32 registers with a few spilled words outside the loop beat 40 registers and unroll 4 by 19%).
MARCH_KERNEL(joseph, METHOD_JOSEPH, 1, 1, DRR_MARCH_MIN_BLOCKS_C1)
MARCH_KERNEL(joseph, METHOD_JOSEPH, 2, 1, DRR_MARCH_MIN_BLOCKS_C2)
MARCH_KERNEL(joseph, METHOD_JOSEPH, 4, 1, DRR_MARCH_MIN_BLOCKS_C4)
MARCH_KERNEL(joseph, METHOD_JOSEPH, 4, 2, 1)
MARCH_KERNEL(trilinear, METHOD_TRILINEAR, 1, 1, 8)
MARCH_KERNEL(trilinear, METHOD_TRILINEAR, 2, 1, 6)
MARCH_KERNEL(trilinear, METHOD_TRILINEAR, 4, 1, 5)
MARCH_KERNEL(trilinear, METHOD_TRILINEAR, 4, 2, 1)

// Last pass of the split pipeline: line integrals (p.lint, (B, M, H, W) float32) -> output images.
template <int MAXM>
__device__ __forceinline__ void finish_body(const DrrParams& p) {
    extern __shared__ float sh[];
    THREAD_PIXEL(u, v, b);
    const u32* info = IMAGE_INFO(p, b);
    LOAD_TABLES(p, info, sh);
    if (off_detector(u, v, p.W, p.H)) return;
    const double* cam = IMAGE_CAMERA(p, b);
    const float* li = reinterpret_cast<const float*>(p.lint);
    const size_t pix = (size_t)v * p.W + u;
    float A[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) A[m] = m < p.M ? li[((size_t)b * p.M + m) * p.H * p.W + pix] : 0.0f;
    finish_pixel<MAXM>(p, sh, cam, info, u, v, b, A);
}

extern "C" __global__ void __launch_bounds__(256) drr_finish_m4(const DrrParams p) { finish_body<4>(p); }
extern "C" __global__ void __launch_bounds__(256) drr_finish_m8(const DrrParams p) { finish_body<8>(p); }

// ------------------------------------------------------------------------------------- meshes

// The CT's line integrals with meshes (reference: mesh_reference.line_integrals_with_meshes). Per pixel:
// ``ct`` (B, M, H, W) from drr_march_*; ``intervals`` (B, H, W, kmax) double2 and ``n_intervals`` (B, H, W)
// from mesh.cu's mesh_trace: the sorted union of the replacing meshes' inside-intervals [x, y] (world mm of
// t), or null pointers when no mesh replaces. Each interval becomes the range of march samples whose t lies
// in it, the same rule as the reference's ct_line_integrals_inside:
//   trilinear  t_k = t0 + (k + 1/2) h:            k in [ceil((x - t0)/h - 1/2), floor((y - t0)/h - 1/2)];
//   Joseph     slice c at t_c = (c - s_a) / d_a:  c in [ceil(min(c_x, c_y)), floor(max(c_x, c_y))],
//              c_x = s_a + x d_a (slice index k = c - c_lo),
// clipped to [0, ns - 1]; those samples are marched exactly as the march kernel does (same points, same
// fetches) and subtracted. Output ``out`` (B, M_out, H, W): max(ct - inside, 0) for the CT's M channels,
// 0 for the mesh materials the CT lacks (mesh.cu's mesh_add_chords adds every mesh afterwards).
template <int C, int NT, int EXACT, int METHOD>
__device__ __forceinline__ void mesh_ct_body(const DrrParams& p, const float* __restrict__ ct,
                                             const double2* __restrict__ intervals,
                                             const int* __restrict__ n_intervals, float* __restrict__ out,
                                             int kmax, int M_out) {
    constexpr int MAXM = (NT == 1) ? C : 8;
    THREAD_PIXEL(u, v, b);
    if (off_detector(u, v, p.W, p.H)) return;
    const size_t HW = (size_t)p.H * p.W;
    const size_t pix = (size_t)v * p.W + u;
    float inside[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) inside[m] = 0.0f;
    float h = 0.0f;
    const int ni = n_intervals ? n_intervals[(size_t)b * HW + pix] : 0;
    if (ni > 0) {
        const u32* info = IMAGE_INFO(p, b);
        const double* cam = IMAGE_CAMERA(p, b);
        const Ray r = setup_ray<METHOD>(p, cam, info, u, v);
        h = r.h;
        const RayGeometry geo = ray_geometry(p, cam, u, v);
        const int a = dominant_axis(geo.d0, geo.d1, geo.d2);
        const double da = pick3(a, geo.d0, geo.d1, geo.d2), sa = pick3(a, geo.s0, geo.s1, geo.s2);
        const double hd = METHOD == METHOD_TRILINEAR ? fmax(geo.t1 - geo.t0, 0.0) / fmax((double)r.ns, 1.0) : 1.0;
        const double c_lo = METHOD == METHOD_JOSEPH ? ceil(fmin(sa + geo.t0 * da, sa + geo.t1 * da)) : 0.0;
        const double2* iv = intervals + ((size_t)b * HW + pix) * kmax;
        for (int k = 0; k < ni && r.ns > 0; ++k) {
            const double x = iv[k].x, y = iv[k].y;
            double j_lo, j_hi;
            if (METHOD == METHOD_TRILINEAR) {
                j_lo = ceil((x - geo.t0) / hd - 0.5);
                j_hi = floor((y - geo.t0) / hd - 0.5);
            } else {
                const double cx = sa + x * da, cy = sa + y * da;
                j_lo = ceil(fmin(cx, cy)) - c_lo;
                j_hi = floor(fmax(cx, cy)) - c_lo;
            }
            j_lo = fmax(j_lo, 0.0);
            j_hi = fmin(j_hi, (double)(r.ns - 1));
            if (!(j_hi >= j_lo)) continue;
            const int j0 = (int)j_lo;
            const float fj = (float)j0;
            Ray sub = r;  // samples j0 .. j_hi of the ray: the same points, base moved to sample j0
            sub.ns = (int)j_hi - j0 + 1;
            sub.c0 = r.c0 + j0;
            sub.b0 = fmaf(fj, r.g0, r.b0);
            sub.b1 = fmaf(fj, r.g1, r.b1);
            sub.b2 = fmaf(fj, r.g2, r.b2);
            march_ray<C, NT, EXACT, METHOD>(p, sub, inside);
        }
    }
    const float scale_cm = h * 0.1f;
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
        if (m < p.M) {
            const float c = ct[((size_t)b * p.M + m) * HW + pix];
            out[((size_t)b * M_out + m) * HW + pix] = fmaxf(c - inside[m] * scale_cm, 0.0f);
        }
    }
    for (int m = p.M; m < M_out; ++m) out[((size_t)b * M_out + m) * HW + pix] = 0.0f;
}

// drr_mesh_ct_<method>_c<C>_t<NT>_<hw|exact>: the CT minus what replacing meshes remove, widened to M_out.
#define MESH_CT_KERNEL(M, METHOD, C, NT, EXACT, F)                                                            \
    extern "C" __global__ void __launch_bounds__(256) drr_mesh_ct_##M##_c##C##_t##NT##_##F(                    \
        const DrrParams p, const float* ct, const double2* intervals, const int* n_intervals, float* out, int kmax, \
        int M_out) {                                                                                             \
        mesh_ct_body<C, NT, EXACT, METHOD>(p, ct, intervals, n_intervals, out, kmax, M_out);                    \
    }
#define MESH_CT_KERNELS(C, NT)                                         \
    MESH_CT_KERNEL(joseph, METHOD_JOSEPH, C, NT, 0, hw)                \
    MESH_CT_KERNEL(joseph, METHOD_JOSEPH, C, NT, 1, exact)             \
    MESH_CT_KERNEL(trilinear, METHOD_TRILINEAR, C, NT, 0, hw)          \
    MESH_CT_KERNEL(trilinear, METHOD_TRILINEAR, C, NT, 1, exact)

MESH_CT_KERNELS(1, 1)
MESH_CT_KERNELS(2, 1)
MESH_CT_KERNELS(4, 1)
MESH_CT_KERNELS(4, 2)

// ------------------------------------------------------------------------------------- neglog pass 2

// The zstd-delta codec's transform (drrfarm.sinks.parquet.delta_planes) of B (H, W) uint16 images, on the GPU
// so a farm's encoders only run zstd: each row minus the row above (modulo 2^16; row 0 as is), then the
// image's high bytes followed by its low bytes: planes[b][0][k] = high byte, planes[b][1][k] = low byte.
extern "C" __global__ void delta_planes_u16(const u16* __restrict__ img, unsigned char* __restrict__ planes, int B,
                                            int H, int W) {
    const long long n = (long long)H * W, total = n * B;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / n, k = i - b * n;
        u16 v = img[i];
        if (k >= W) v = (u16)(v - img[i - W]);
        unsigned char* out = planes + 2 * n * b;
        out[k] = (unsigned char)(v >> 8);
        out[n + k] = (unsigned char)(v & 0xFF);
    }
}

extern "C" __global__ void drr_minmax_init(u32* minmax, int B) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < B) {
        minmax[2 * i] = 0x7f7fffffu;  // FLT_MAX
        minmax[2 * i + 1] = 0u;       // +0.0
    }
}

// DeepDRR's neglog: x = -log(I + min I + eps), min-max rescaled to [0, 1] per image (constant -> 0).
extern "C" __global__ void drr_neglog_finish(const DrrParams p) {
    const size_t hw = (size_t)p.H * p.W;
    const size_t total = hw * p.B;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int b = (int)(idx / hw);
        const u32* mm = reinterpret_cast<const u32*>(p.minmax) + 2 * b;
        const float lo_i = __uint_as_float(mm[0]);
        const float hi_i = __uint_as_float(mm[1]);
        const float I = reinterpret_cast<const float*>(p.scratch)[idx];
        const float x = -logf(I + lo_i + NEGLOG_EPS);
        const float x_lo = -logf(hi_i + lo_i + NEGLOG_EPS);
        const float x_hi = -logf(lo_i + lo_i + NEGLOG_EPS);
        const float range = x_hi - x_lo;
        store_output(p, idx, range > 0.0f ? (x - x_lo) / range : 0.0f);
    }
}

// ------------------------------------------------------------------------------------- volume upload

// Pack a chunk of planar float32 densities (M, ...) into half-float texels of one layout.
// The chunk holds layers [l0, l0 + nl) of slice axis `axis`; its planar shape is (M, I, J, K) with the
// extent along `axis` replaced by nl.  Output: [nl][Y][X][C] half-float bits, channels ch0..ch0+C-1.
extern "C" __global__ void pack_layout(const float* __restrict__ dens, u16* __restrict__ out, int M, int ch0,
                                       int C, int nI, int nJ, int nK, int axis, int nl) {
    const int X = axis == 2 ? nJ : nK;
    const int Y = axis == 0 ? nJ : nI;
    const size_t total = (size_t)nl * X * Y;
    const size_t ci = axis == 0 ? (size_t)nl : (size_t)nI;
    const size_t cj = axis == 1 ? (size_t)nl : (size_t)nJ;
    const size_t ck = axis == 2 ? (size_t)nl : (size_t)nK;
    const size_t plane = ci * cj * ck;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t x = idx % X;
        const size_t y = (idx / X) % Y;
        const size_t l = idx / ((size_t)X * Y);
        size_t i, j, k;
        if (axis == 0) { i = l; j = y; k = x; }
        else if (axis == 1) { i = y; j = l; k = x; }
        else { i = y; j = x; k = l; }
        const size_t src = (i * cj + j) * ck + k;
        u16 h[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int m = ch0 + c;
            h[c] = (c < C && m < M) ? f32_to_f16_bits(dens[(size_t)m * plane + src]) : (u16)0;
        }
        if (C == 4) {
            reinterpret_cast<ushort4*>(out)[idx] = make_ushort4(h[0], h[1], h[2], h[3]);
        } else if (C == 2) {
            reinterpret_cast<ushort2*>(out)[idx] = make_ushort2(h[0], h[1]);
        } else {
            out[idx] = h[0];
        }
    }
}

// ------------------------------------------------------------------------------------- self-tests

// Philox4x32-10 known-answer test: in = n x (ctr[4], key[2]), out = n x 4 words.
extern "C" __global__ void philox_kat(const u32* __restrict__ in, u32* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u32* q = in + 6 * i;
    const uint4 r = philox4x32_10(make_uint4(q[0], q[1], q[2], q[3]), make_uint2(q[4], q[5]));
    out[4 * i] = r.x;
    out[4 * i + 1] = r.y;
    out[4 * i + 2] = r.z;
    out[4 * i + 3] = r.w;
}

// Poisson sampler check: out[i] = Poisson(lam[i / per]) drawn with key (seed, 0), counter i.
extern "C" __global__ void poisson_draws(const double* __restrict__ lam, double* __restrict__ out, int n, int per,
                                         u32 seed) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    Rng g((u32)i, 0x44525246u, seed, 0u);
    out[i] = poisson(g, lam[i / per]);
}
