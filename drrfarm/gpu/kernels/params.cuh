// The kernels' parameter structs (passed by value) and per-image record strides, side by side.
// Their host mirrors are in drrfarm/gpu/layouts.py (tests/test_gpu_layouts.py checks each field).
#pragma once

#include "shared.cuh"

// ---------------------------------------------------------------------------------- drr.cu

#define DRR_CAM_STRIDE 24  // doubles per image camera record (drrfarm.render.cuda_plan.camera_block)
#define DRR_INFO_STRIDE 4  // u32 per image: spectrum index, seed lo, seed hi, trilinear layout axis

struct DrrParams {
    u64 cams;     // const double*: DRR_CAM_STRIDE doubles per image (see camera_block in cuda_plan.py)
    u64 info;     // const u32*: DRR_INFO_STRIDE per image: spectrum index, seed lo, seed hi, trilinear layout axis
    u64 tables;   // const float*: per spectrum, tstride floats: nb, S0, w_sig[nbmax], w_cnt[nbmax], mu[nbmax*M]
    u64 out;      // output buffer
    u64 scratch;  // float* (B,H,W) intensity for neglog
    u64 minmax;   // u32* (B,2) min/max intensity bits for neglog
    u64 lint;     // const float* (B,M,H,W) line integrals (input of drr_finish)
    u64 rays;     // float4* 3 per pixel: Ray records (split pipeline)
    u64 tex[6];   // linear-filtered texture objects, [axis * 2 + t]
    u64 texp[6];  // point-filtered texture objects over the same arrays (exact interpolation mode)
    int nI, nJ, nK, M;
    int H, W, B, tstride;
    int nbmax, mode, output, out_dtype;
    float scale, photons, sigma_e, tau_min;
    int solid_angle, pad0;
    double scale64;  // the uint16 scale in float64: stored = rint(double(y) / scale64), as the CPU quantiser
    u64 scatter;  // const float* (B, 2, scatter_h, scatter_w): scatter signal and counts tallies, or 0
    int scatter_h, scatter_w, pad3, pad4;
};
static_assert(sizeof(DrrParams) == 264, "DrrParams must match DRR_PARAMS_DTYPE (264 bytes)");

// ---------------------------------------------------------------------------------- mesh.cu

#define MESH_CAM_STRIDE 16   // per image: R^T K^-1 (9, row-major), source (3), sdd_mm, 3 unused
#define MESH_POSE_STRIDE 12  // per (image, mesh): mesh_from_world, 3x4 row-major
#define MESH_MAX_HITS 64     // hits kept per ray and mesh
#define MESH_KMAX_LOCAL 16   // the most replacing intervals a ray keeps (the host's kmax limit)

struct MeshParams {
    u64 cams;         // const double* (B, MESH_CAM_STRIDE)
    u64 poses;        // const double* (B, NM, MESH_POSE_STRIDE)
    u64 nodes;        // const float4* (N_total, 2): (lo.xyz, index bits), (hi.xyz, count bits)
    u64 tris;         // const double* (F_total, 9): v0, e1, e2
    u64 meshes;       // const int4* (NM): node offset, slot offset, mode (0 add, 1 replace), channel
    u64 density;      // const float* (NM)
    u64 chords;       // float* (B, NM, H, W) or 0
    u64 lint;         // float* (B, M, H, W) or 0
    u64 intervals;    // double2* (B, H, W, kmax) or 0
    u64 n_intervals;  // int* (B, H, W) or 0
    u64 overflow;     // u32* [2] or 0
    int H, W, B, NM;
    int M, kmax, pad0, pad1;
};
static_assert(sizeof(MeshParams) == 120, "MeshParams must match MESH_PARAMS_DTYPE (120 bytes)");

// ---------------------------------------------------------------------------------- scatter.cu

#define SCATTER_CAM_STRIDE 32  // per image: R (9), t (3), K row 0 (3), K row 1 (3), sdd, M = R^T K^-1 (9), source (3), pad

struct ScatterParams {
    u64 dens;          // const float* (I, J, K, M) g/cm3
    u64 mu;            // const double* (M, 3, NE) cm2/g: photoelectric, Compton, Rayleigh
    u64 majorant;      // const double* (NE) 1/mm
    u64 compton_s;     // const double* (M, NX) S(x)/Z
    u64 rayleigh_cdf;  // const double* (M, NX) integral of F^2 d(x^2)
    u64 eta;           // const double* (NE) detector absorption probability
    u64 spec_kev;      // const double* (NB)
    u64 spec_cdf;      // const double* (NB)
    u64 cams;          // const double* (n_img, SCATTER_CAM_STRIDE)
    u64 keys;          // const u32* (n_img, 4): seed lo, seed hi, image word, unused
    u64 tally;         // float* (n_img, 4, Ht, Wt)
    u64 energy;        // double* (n_img, 4)
    u64 interactions;  // u64* (n_img, 3)
    u64 events;        // forced detection: double* (n_img, event_capacity, 8) collisions (pos, dir, E, weight)
    double ijk_from_world[12];  // 3x4 row-major
    double e0, de, x_step, signal_norm, count_norm, forced_step_mm;
    long long photons;          // per image
    int I, J, K, M;
    int NE, NX, NB, H;
    int W, Ht, Wt, solid_angle;
    int signal_per_photon, n_img, forced, event_capacity;  // forced: 1 = score scatter by forced detection
    u64 event_counts;  // u64* (n_img) collisions recorded (may exceed event_capacity: then some were dropped)
    u64 forced_norms;  // const double* (2, M, NE) angular normalisations, Compton then Rayleigh
    double cutoff_kev;  // photons below it are absorbed where they are (0: only below the tables' first energy)
};
static_assert(sizeof(ScatterParams) == 352, "ScatterParams must match SCATTER_PARAMS_DTYPE (352 bytes)");
