// drrfarm mesh kernels: the GPU twin of drrfarm/render/mesh_reference.py (ray / triangle-mesh intervals).
//
// One thread traces one detector pixel of one image through every mesh of the scene:
//   ray set-up from the camera in float64 (world frame: source s, unit direction d, t to the detector),
//   per mesh: the ray moved into the model frame by mesh_from_world (rigid, so t stays world mm),
//   BVH traversal (float32 boxes, rounded outward on the host; float64 slab test), Moeller-Trumbore in
//   float64 with barycentric slack EPS_BARY, hits kept sorted by t, clustering of hits closer than
//   CLUSTER_REL (1 + |t|) into one crossing (entries / exits / grazes dropped), inside-intervals from the
//   running count of entries minus exits (started at the number of shells the source is inside), closed
//   at t_detector if still open, clipped to [0, t_detector].
// Outputs (each optional, a null pointer skips it):
//   chords      (B, NM, H, W) float32: path length (mm) through each mesh;
//   lint        (B, M, H, W)  float32: += density * chord / 10 (g/cm2) in the mesh's material channel;
//   intervals   (B, H, W, kmax) double2 and n_intervals (B, H, W) int: the per-ray union of the
//               *replacing* meshes' intervals, sorted and disjoint (touching intervals merged). A CT
//               march skips every sample whose t lies in a closed interval [x, y] (float64, so the
//               GPU's skip decisions are the CPU reference's).
//   overflow    u32[2]: rays whose hit list (MESH_MAX_HITS per mesh) or union (kmax) overflowed
//               (the result of such a ray is incomplete: fall back to the CPU reference for it).
// No CUDA headers, no curand; shared definitions in drrfarm/gpu/kernels/shared.cuh and params.cuh.
// Scene layout: drrfarm.render.mesh_reference.pack_scene / pack_poses / pack_cameras.

#include "params.cuh"  // MeshParams, MESH_CAM_STRIDE, MESH_POSE_STRIDE, MESH_MAX_HITS, MESH_KMAX_LOCAL

#define MESH_STACK 64

#define EPS_BARY 1e-9
#define DET_TOL 1e-15
#define CLUSTER_REL 1e-9

struct Vec3 {
    double x, y, z;
};

__device__ __forceinline__ Vec3 v3(double x, double y, double z) {
    Vec3 r;
    r.x = x;
    r.y = y;
    r.z = z;
    return r;
}
__device__ __forceinline__ Vec3 sub(const Vec3& a, const Vec3& b) { return v3(a.x - b.x, a.y - b.y, a.z - b.z); }
__device__ __forceinline__ double dot(const Vec3& a, const Vec3& b) { return a.x * b.x + a.y * b.y + a.z * b.z; }
__device__ __forceinline__ Vec3 cross(const Vec3& a, const Vec3& b) {
    return v3(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}
__device__ __forceinline__ double norm(const Vec3& a) { return sqrt(dot(a, a)); }

// One axis of the slab test; a NaN (ray in a face's plane, parallel to it) gives no constraint.
__device__ __forceinline__ void slab_axis(double lo, double hi, double o, double inv, double& near, double& far) {
    const double ta = (lo - o) * inv;
    const double tb = (hi - o) * inv;
    if (isnan(ta) || isnan(tb)) return;
    near = fmax(near, fmin(ta, tb));
    far = fmin(far, fmax(ta, tb));
}

// Sorted insert of a hit; returns false when the list is full.
__device__ __forceinline__ bool insert_hit(double* ht, signed char* hs, int& nh, double t, signed char s) {
    if (nh >= MESH_MAX_HITS) return false;
    int i = nh;
    while (i > 0 && ht[i - 1] > t) {
        ht[i] = ht[i - 1];
        hs[i] = hs[i - 1];
        --i;
    }
    ht[i] = t;
    hs[i] = s;
    ++nh;
    return true;
}

// Merge [a, b] into the sorted, disjoint list (touching or overlapping intervals merge).
__device__ __forceinline__ bool union_insert(double* ua, double* ub, int& nu, double a, double b) {
    // absorb every interval that overlaps or touches [a, b]
    int w = 0;
    int pos = -1;
    for (int k = 0; k < nu; ++k) {
        if (ub[k] >= a && ua[k] <= b) {
            a = fmin(a, ua[k]);
            b = fmax(b, ub[k]);
        } else {
            if (pos < 0 && ua[k] > b) pos = w;
            ua[w] = ua[k];
            ub[w] = ub[k];
            ++w;
        }
    }
    nu = w;
    if (pos < 0) pos = nu;
    if (nu >= MESH_KMAX_LOCAL) return false;
    for (int k = nu; k > pos; --k) {
        ua[k] = ua[k - 1];
        ub[k] = ub[k - 1];
    }
    ua[pos] = a;
    ub[pos] = b;
    ++nu;
    return true;
}

extern "C" __global__ void __launch_bounds__(128) mesh_trace(const MeshParams p) {
    THREAD_PIXEL(u, v, b);
    if (off_detector(u, v, p.W, p.H)) return;
    const size_t HW = (size_t)p.H * p.W;
    const size_t pix = (size_t)v * p.W + u;

    // ---- the reference's ray (geometry.Camera.pixel_rays_world, detector_distance_along_ray)
    const double* cam = reinterpret_cast<const double*>(p.cams) + MESH_CAM_STRIDE * b;
    const double pu = (double)u, pv = (double)v;
    const double cx = cam[0] * pu + cam[1] * pv + cam[2];
    const double cy = cam[3] * pu + cam[4] * pv + cam[5];
    const double cz = cam[6] * pu + cam[7] * pv + cam[8];
    const double nrm = sqrt(cx * cx + cy * cy + cz * cz);
    const Vec3 dw = v3(cx / nrm, cy / nrm, cz / nrm);
    const Vec3 sw = v3(cam[9], cam[10], cam[11]);
    const double t_max = cam[12] * nrm;  // sdd / cos(theta)

    const float4* nodes = reinterpret_cast<const float4*>(p.nodes);
    const double* tris = reinterpret_cast<const double*>(p.tris);
    const int4* meshes = reinterpret_cast<const int4*>(p.meshes);
    const float* density = reinterpret_cast<const float*>(p.density);

    double ht[MESH_MAX_HITS];
    signed char hs[MESH_MAX_HITS];
    double ua[MESH_KMAX_LOCAL], ub[MESH_KMAX_LOCAL];
    int nu = 0;
    bool hit_overflow = false, union_overflow = false;
    int stack[MESH_STACK];

    for (int mi = 0; mi < p.NM; ++mi) {
        const int4 md = meshes[mi];
        const double* P = reinterpret_cast<const double*>(p.poses) + ((size_t)b * p.NM + mi) * MESH_POSE_STRIDE;
        const Vec3 o = v3(P[0] * sw.x + P[1] * sw.y + P[2] * sw.z + P[3], P[4] * sw.x + P[5] * sw.y + P[6] * sw.z + P[7],
                          P[8] * sw.x + P[9] * sw.y + P[10] * sw.z + P[11]);
        const Vec3 d = v3(P[0] * dw.x + P[1] * dw.y + P[2] * dw.z, P[4] * dw.x + P[5] * dw.y + P[6] * dw.z,
                          P[8] * dw.x + P[9] * dw.y + P[10] * dw.z);
        const Vec3 inv = v3(1.0 / d.x, 1.0 / d.y, 1.0 / d.z);
        const double dlen = norm(d);

        // ---- BVH traversal + Moeller-Trumbore
        int nh = 0;
        int sp = 0;
        int node = 0;
        while (true) {
            const float4 a = nodes[2 * (size_t)(md.x + node)];
            const float4 c = nodes[2 * (size_t)(md.x + node) + 1];
            double near = -inf64();
            double far = inf64();
            slab_axis((double)a.x, (double)c.x, o.x, inv.x, near, far);
            slab_axis((double)a.y, (double)c.y, o.y, inv.y, near, far);
            slab_axis((double)a.z, (double)c.z, o.z, inv.z, near, far);
            const bool hit = (near <= far) && (far >= 0.0) && (near <= t_max);
            if (hit) {
                const int index = __float_as_int(a.w);
                const int count = __float_as_int(c.w);
                if (count == 0) {  // inner node: left child next, right child on the stack
                    if (sp < MESH_STACK) {
                        stack[sp++] = index;
                    } else {
                        hit_overflow = true;
                    }
                    node = node + 1;
                    continue;
                }
                for (int k = index; k < index + count; ++k) {
                    const double* tr = tris + (size_t)(md.y + k) * 9;
                    const Vec3 v0 = v3(tr[0], tr[1], tr[2]);
                    const Vec3 e1 = v3(tr[3], tr[4], tr[5]);
                    const Vec3 e2 = v3(tr[6], tr[7], tr[8]);
                    const Vec3 pv3 = cross(d, e2);
                    const double det = dot(e1, pv3);
                    const double scale = norm(e1) * norm(e2) * dlen;
                    if (!(fabs(det) > DET_TOL * scale)) continue;
                    const double idet = 1.0 / det;
                    const Vec3 tv = sub(o, v0);
                    const double bu = dot(tv, pv3) * idet;
                    const Vec3 q = cross(tv, e1);
                    const double bv = dot(d, q) * idet;
                    const double t = dot(e2, q) * idet;
                    if (bu >= -EPS_BARY && bv >= -EPS_BARY && bu + bv <= 1.0 + EPS_BARY && t > 0.0 && t <= t_max) {
                        if (!insert_hit(ht, hs, nh, t, det > 0.0 ? (signed char)1 : (signed char)-1)) hit_overflow = true;
                    }
                }
            }
            if (sp == 0) break;
            node = stack[--sp];
        }

        // ---- clusters -> crossing events (compacted in place)
        int ne = 0;
        for (int i = 0; i < nh;) {
            int j = i + 1;
            bool pos = hs[i] > 0, neg = hs[i] < 0;
            while (j < nh && ht[j] - ht[j - 1] <= CLUSTER_REL * (1.0 + fabs(ht[j - 1]))) {
                pos = pos || hs[j] > 0;
                neg = neg || hs[j] < 0;
                ++j;
            }
            if (pos != neg) {
                ht[ne] = ht[i];
                hs[ne] = pos ? (signed char)1 : (signed char)-1;
                ++ne;
            }
            i = j;
        }
        // ---- running count -> intervals
        int count = 0, min_count = 0;
        for (int i = 0; i < ne; ++i) {
            count += hs[i];
            min_count = min(min_count, count);
        }
        int c = -min_count;  // shells the source is inside
        double t_open = 0.0;
        double chord = 0.0;
        const bool replace = md.z == 1;
        for (int i = 0; i < ne; ++i) {
            const int before = c;
            c += hs[i];
            if (before <= 0 && c > 0) {
                t_open = ht[i];
            } else if (before > 0 && c <= 0) {
                const double x = fmax(t_open, 0.0), y = fmin(ht[i], t_max);
                if (y > x) {
                    chord += y - x;
                    if (replace && !union_insert(ua, ub, nu, x, y)) union_overflow = true;
                }
            }
        }
        if (c > 0) {  // still inside at the end: closed at the detector
            const double x = fmax(t_open, 0.0), y = t_max;
            if (y > x) {
                chord += y - x;
                if (replace && !union_insert(ua, ub, nu, x, y)) union_overflow = true;
            }
        }
        if (p.chords) reinterpret_cast<float*>(p.chords)[((size_t)b * p.NM + mi) * HW + pix] = (float)chord;
        if (p.lint && chord > 0.0) {
            float* li = reinterpret_cast<float*>(p.lint) + ((size_t)b * p.M + md.w) * HW + pix;
            *li += (float)((double)density[mi] * chord * 0.1);
        }
    }

    if (p.intervals) {
        double2* out = reinterpret_cast<double2*>(p.intervals) + ((size_t)b * HW + pix) * p.kmax;
        const int n = min(nu, p.kmax);
        if (nu > p.kmax) union_overflow = true;
        for (int k = 0; k < n; ++k) out[k] = make_double2(ua[k], ub[k]);
        if (p.n_intervals) reinterpret_cast<int*>(p.n_intervals)[(size_t)b * HW + pix] = n;
    }
    if (p.overflow) {
        u32* of = reinterpret_cast<u32*>(p.overflow);
        if (hit_overflow) atomicAdd(of, 1u);
        if (union_overflow) atomicAdd(of + 1, 1u);
    }
}

// Count, per pixel, the trilinear march samples t_k = t0 + (k + 1/2) h (k < n) that fall inside the pixel's
// replacing intervals: the rule a CT march applies to skip them (exposed for tests of that rule).
// t0 / h / n: (B, H, W) float64 / float64 / int; out (B, H, W) int.
extern "C" __global__ void mesh_count_skipped(const MeshParams p, const double* __restrict__ t0,
                                              const double* __restrict__ h, const int* __restrict__ n,
                                              int* __restrict__ out) {
    THREAD_PIXEL(u, v, b);
    if (off_detector(u, v, p.W, p.H)) return;
    const size_t i = ((size_t)b * p.H + v) * p.W + u;
    const double2* iv = reinterpret_cast<const double2*>(p.intervals) + i * p.kmax;
    const int ni = reinterpret_cast<const int*>(p.n_intervals)[i];
    int skipped = 0, cur = 0;
    for (int k = 0; k < n[i]; ++k) {
        const double tk = t0[i] + ((double)k + 0.5) * h[i];
        while (cur < ni && tk > iv[cur].y) ++cur;  // intervals are sorted: walk a pointer
        if (cur < ni && tk >= iv[cur].x) ++skipped;
    }
    out[i] = skipped;
}

// lint[b, channel(m)] += density(m) * chords[b, m] / 10 for every mesh m (g/cm2): the mesh contribution added
// after a CT march that *writes* the line-integral buffer (split pipeline: mesh_trace with chords and
// intervals -> march skipping the intervals -> mesh_add_chords -> finish).
extern "C" __global__ void mesh_add_chords(const MeshParams p) {
    THREAD_PIXEL(u, v, b);
    if (off_detector(u, v, p.W, p.H)) return;
    const size_t HW = (size_t)p.H * p.W;
    const size_t pix = (size_t)v * p.W + u;
    const int4* meshes = reinterpret_cast<const int4*>(p.meshes);
    const float* density = reinterpret_cast<const float*>(p.density);
    const float* chords = reinterpret_cast<const float*>(p.chords);
    float* lint = reinterpret_cast<float*>(p.lint);
    for (int mi = 0; mi < p.NM; ++mi) {
        const float c = chords[((size_t)b * p.NM + mi) * HW + pix];
        if (c > 0.0f) lint[((size_t)b * p.M + meshes[mi].w) * HW + pix] += density[mi] * c * 0.1f;
    }
}
