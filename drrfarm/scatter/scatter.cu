// drrfarm scatter Monte Carlo: the GPU twin of drrfarm/scatter/reference.py (read its docstring first).
//
// One thread follows photons p = tid, tid + stride, ... of one image (blockIdx.y): emission from the
// focal spot toward a uniform point of the detector, Woodcock tracking through the nearest-voxel
// material densities, photoelectric absorption, Compton scattering (Klein-Nishina x S(x)/Z) and
// Rayleigh scattering (F^2(x) x (1 + cos^2)/2), detection on the panel with the detector model.
// Random numbers: Philox4x32-10, counter (photon, draw, SCATTER_PURPOSE, image word), key = the image's
// 64-bit seed; one 4-word block per emission, per tracking step and per rejection trial, exactly as the
// CPU reference draws them, so both replay the same histories (all arithmetic in float64).
// Tallies: float atomics into (img, 4, Ht, Wt) = scatter signal, scatter counts, primary signal, primary
// counts (unnormalised sums of weights; the host divides by the open-field photons per bin).
// Energy book (img, 4) = emitted, deposited, escaped, detected (double atomics, one per thread);
// interaction counts (img, 3) = photoelectric, Compton, Rayleigh.
// Forced detection (p.forced, the fast estimate; drrfarm/scatter/forced.py): scatter_mc records every real
// collision instead of booking scattered photons on the panel, and scatter_forced (below) scores each
// collision's expected scatter on every tally bin. Photons below p.cutoff_kev are absorbed where they are.
// No CUDA headers, no curand; shared definitions in drrfarm/gpu/kernels/shared.cuh and params.cuh.

#include "params.cuh"  // ScatterParams, SCATTER_CAM_STRIDE; shared.cuh: Philox4x32-10, open_uniform

#define SCATTER_PURPOSE 0x5CA77E12u
#define MAX_TRIALS 1000
#define HC_KEV_ANGSTROM 12.398419843320026
#define ELECTRON_REST_ENERGY_KEV 510.99895
#define TWO_PI 6.283185307179586
#define DETECTOR_TOL_MM 1e-3  // photons this far past the detector plane (round-off) still hit it

struct Block4 {
    double u0, u1, u2, u3;
};

// One block of four uniforms in (0, 1) for (photon, draw); draw advances.
__device__ __forceinline__ Block4 draw_block(u64 photon, u32& draw, uint2 key, u32 image) {
    const uint4 w = philox4x32_10(make_uint4((u32)photon, draw, SCATTER_PURPOSE, image), key);
    draw += 1u;
    Block4 b;
    b.u0 = open_uniform(w.x);
    b.u1 = open_uniform(w.y);
    b.u2 = open_uniform(w.z);
    b.u3 = open_uniform(w.w);
    return b;
}

// Where energy e falls on the tables' uniform grid: node i and weight w of node i + 1 (clamped to the grid).
struct EnergyCell {
    int i;
    double w;
};

__device__ __forceinline__ EnergyCell energy_cell(double e, const ScatterParams& p) {
    double f = (e - p.e0) / p.de;
    f = fmin(fmax(f, 0.0), (double)p.NE - 1.000001);
    const int i = (int)f;
    return EnergyCell{i, f - (double)i};
}

__device__ __forceinline__ double at_cell(const double* t, EnergyCell c) {
    return t[c.i] * (1.0 - c.w) + t[c.i + 1] * c.w;
}

__device__ __forceinline__ double interp_energy(const double* t, double e, const ScatterParams& p) {
    return at_cell(t, energy_cell(e, p));
}

// The M densities of the voxel nearest to world point (x, y, z), clamped to the grid.
__device__ __forceinline__ const float* nearest_voxel(const float* dens, double x, double y, double z,
                                                      const ScatterParams& p) {
    const double* A = p.ijk_from_world;
    const double fi = A[0] * x + A[1] * y + A[2] * z + A[3];
    const double fj = A[4] * x + A[5] * y + A[6] * z + A[7];
    const double fk = A[8] * x + A[9] * y + A[10] * z + A[11];
    const int i = min(max((int)floor(fi + 0.5), 0), p.I - 1);
    const int j = min(max((int)floor(fj + 0.5), 0), p.J - 1);
    const int k = min(max((int)floor(fk + 0.5), 0), p.K - 1);
    return dens + (((size_t)i * p.J + j) * p.K + k) * p.M;
}

// Attenuation per mm of a voxel at energy cell c: the same sums, in the same order, as the reference's cumsum.
__device__ __forceinline__ double local_mu(const float* vox, const double* mu, EnergyCell c, const ScatterParams& p) {
    double mu_local = 0.0;
    for (int m = 0; m < p.M; ++m) {
        const double rho = (double)vox[m];
        for (int q = 0; q < 3; ++q) mu_local += rho * at_cell(mu + ((size_t)m * 3 + q) * p.NE, c) / 10.0;
    }
    return mu_local;
}

__device__ __forceinline__ double interp_x(const double* row, double x, const ScatterParams& p) {
    double f = fmin(fmax(x / p.x_step, 0.0), (double)p.NX - 1.000001);
    const int j = (int)f;
    const double w = f - (double)j;
    return row[j] * (1.0 - w) + row[j + 1] * w;
}

struct Ray {
    double px, py, pz, dx, dy, dz;
};

// Entry and exit distance of the ray through the index box [-0.5, n-0.5]^3 (ray in world mm).
__device__ void box_interval(const Ray& r, const ScatterParams& p, double& t_in, double& t_out) {
    const double* A = p.ijk_from_world;
    const double pi[3] = {A[0] * r.px + A[1] * r.py + A[2] * r.pz + A[3],
                          A[4] * r.px + A[5] * r.py + A[6] * r.pz + A[7],
                          A[8] * r.px + A[9] * r.py + A[10] * r.pz + A[11]};
    const double di[3] = {A[0] * r.dx + A[1] * r.dy + A[2] * r.dz, A[4] * r.dx + A[5] * r.dy + A[6] * r.dz,
                          A[8] * r.dx + A[9] * r.dy + A[10] * r.dz};
    const int n[3] = {p.I, p.J, p.K};
    t_in = -INFINITY;
    t_out = INFINITY;
    for (int a = 0; a < 3; ++a) {
        const double hi_edge = (double)n[a] - 0.5;
        double lo, hi;
        if (di[a] != 0.0) {
            const double t1 = (-0.5 - pi[a]) / di[a];
            const double t2 = (hi_edge - pi[a]) / di[a];
            lo = fmin(t1, t2);
            hi = fmax(t1, t2);
        } else {
            const bool inside = pi[a] >= -0.5 && pi[a] <= hi_edge;
            lo = inside ? -INFINITY : INFINITY;
            hi = inside ? INFINITY : -INFINITY;
        }
        t_in = fmax(t_in, lo);
        t_out = fmin(t_out, hi);
    }
}

struct Book {
    double emitted, deposited, escaped, detected;
    u64 photo, compton, rayleigh;
};

// A photon leaving the volume: book its energy, and its weights on the panel if it hits it.
__device__ void detect(const Ray& r, double e, double g, bool scattered, const double* cam, const ScatterParams& p,
                       Book& book, float* tally) {
    book.escaped += g * e;
    const double* R = cam;
    const double* t = cam + 9;
    const double cx = R[0] * r.px + R[1] * r.py + R[2] * r.pz + t[0];
    const double cy = R[3] * r.px + R[4] * r.py + R[5] * r.pz + t[1];
    const double cz = R[6] * r.px + R[7] * r.py + R[8] * r.pz + t[2];
    const double dx = R[0] * r.dx + R[1] * r.dy + R[2] * r.dz;
    const double dy = R[3] * r.dx + R[4] * r.dy + R[5] * r.dz;
    const double dz = R[6] * r.dx + R[7] * r.dy + R[8] * r.dz;
    if (!(dz > 0.0)) return;
    const double sdd = cam[18];
    const double s = (sdd - cz) / dz;
    if (!(s >= -DETECTOR_TOL_MM)) return;  // a volume ending at the panel leaves a round-off behind it
    const double X = cx + s * dx;
    const double Y = cy + s * dy;
    const double u = (cam[12] * X + cam[13] * Y) / sdd + cam[14];
    const double v = (cam[16] * Y) / sdd + cam[17];
    const double bu = floor((u + 0.5) * ((double)p.Wt / (double)p.W));
    const double bv = floor((v + 0.5) * ((double)p.Ht / (double)p.H));
    if (!(bu >= 0.0 && bu < (double)p.Wt && bv >= 0.0 && bv < (double)p.Ht)) return;
    if (!(u >= -0.5 && u < (double)p.W - 0.5 && v >= -0.5 && v < (double)p.H - 0.5)) return;
    book.detected += g * e;
    const double eta = interp_energy(reinterpret_cast<const double*>(p.eta), e, p);
    const double sig = g * ((p.signal_per_photon ? e * eta : eta) / p.signal_norm);
    const double cnt = g * (eta / p.count_norm);
    if (scattered && p.forced) return;  // forced detection scores scatter at the collisions
    const int bins = p.Ht * p.Wt;
    const int bin = (int)bv * p.Wt + (int)bu;
    float* base = tally + (scattered ? 0 : 2 * bins);
    atomicAdd(base + bin, (float)sig);
    atomicAdd(base + bins + bin, (float)cnt);
}

__device__ void rotate(Ray& r, double cos_t, double phi) {
    const double sin_t = sqrt(fmax(0.0, 1.0 - cos_t * cos_t));
    const double cp = cos(phi), sp = sin(phi);
    const double u = r.dx, v = r.dy, w = r.dz;
    const double perp = sqrt(fmax(0.0, 1.0 - w * w));
    double x, y, z;
    if (perp < 1e-10) {
        x = sin_t * cp;
        y = sin_t * sp;
        z = w >= 0.0 ? cos_t : -cos_t;
    } else {
        x = u * cos_t + sin_t * (u * w * cp - v * sp) / perp;
        y = v * cos_t + sin_t * (v * w * cp + u * sp) / perp;
        z = w * cos_t - sin_t * cp * perp;
    }
    const double n = sqrt(x * x + y * y + z * z);
    r.dx = x / n;
    r.dy = y / n;
    r.dz = z / n;
}

__device__ void sample_compton(double e, int m, u64 photon, u32& draw, uint2 key, u32 image, const ScatterParams& p,
                               double& cos_t, double& ratio) {
    const double k = e / ELECTRON_REST_ENERGY_KEV;
    const double eps0 = 1.0 / (1.0 + 2.0 * k);
    const double eps0_sq = eps0 * eps0;
    const double a1 = -log(eps0);
    const double a2 = a1 + 0.5 * (1.0 - eps0_sq);
    const double* s_row = reinterpret_cast<const double*>(p.compton_s) + (size_t)m * p.NX;
    cos_t = 1.0;
    ratio = 1.0;
    for (int trial = 0; trial < MAX_TRIALS; ++trial) {
        const Block4 u = draw_block(photon, draw, key, image);
        const bool first = u.u0 * a2 < a1;
        const double eps = first ? exp(-a1 * u.u1) : sqrt(eps0_sq + (1.0 - eps0_sq) * u.u1);
        const double one_minus_cos = (1.0 - eps) / (eps * k);
        const double sin2 = one_minus_cos * (2.0 - one_minus_cos);
        const double kn = 1.0 - eps * sin2 / (1.0 + eps * eps);
        const double x = e / HC_KEV_ANGSTROM * sqrt(0.5 * one_minus_cos);
        const double s = interp_x(s_row, x, p);
        cos_t = 1.0 - one_minus_cos;
        ratio = eps;
        if (u.u2 <= kn && u.u3 <= s) return;
    }
}

__device__ double sample_rayleigh(double e, int m, u64 photon, u32& draw, uint2 key, u32 image,
                                  const ScatterParams& p) {
    const double* cdf = reinterpret_cast<const double*>(p.rayleigh_cdf) + (size_t)m * p.NX;
    const int nx = p.NX;
    const double x_max_sq = (e / HC_KEV_ANGSTROM) * (e / HC_KEV_ANGSTROM);
    // the CDF at x_max^2, linear in x^2 between nodes
    double f = fmin(fmax(sqrt(x_max_sq) / p.x_step, 0.0), (double)nx - 1.000001);
    int j = (int)f;
    double sj = (p.x_step * j) * (p.x_step * j);
    double sj1 = (p.x_step * (j + 1)) * (p.x_step * (j + 1));
    const double wmax = fmin(fmax((x_max_sq - sj) / (sj1 - sj), 0.0), 1.0);
    const double a_max = cdf[j] * (1.0 - wmax) + cdf[j + 1] * wmax;
    double cos_t = 1.0;
    for (int trial = 0; trial < MAX_TRIALS; ++trial) {
        const Block4 u = draw_block(photon, draw, key, image);
        const double target = u.u0 * a_max;
        int lo = 0, hi = nx;  // last index with cdf <= target (searchsorted right - 1)
        while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (cdf[mid] <= target) lo = mid; else hi = mid;
        }
        j = min(max(lo, 0), nx - 2);
        const double c0 = cdf[j], c1 = cdf[j + 1];
        const double span = c1 - c0;
        const double frac = span > 0.0 ? (target - c0) / span : 0.0;
        sj = (p.x_step * j) * (p.x_step * j);
        sj1 = (p.x_step * (j + 1)) * (p.x_step * (j + 1));
        const double s = sj + frac * (sj1 - sj);
        cos_t = 1.0 - 2.0 * s / x_max_sq;
        if (2.0 * u.u1 <= 1.0 + cos_t * cos_t) break;
    }
    return cos_t;
}

// Forced detection: keep a real collision (position, direction, energy, weight) for scatter_forced.
__device__ __forceinline__ void record_event(const Ray& r, double e, double g, int img, const ScatterParams& p) {
    u64* count = reinterpret_cast<u64*>(p.event_counts) + img;
    const u64 slot = atomicAdd(reinterpret_cast<unsigned long long*>(count), 1ull);
    if (slot >= (u64)p.event_capacity) return;  // the host sees the count and runs again with room
    double* ev = reinterpret_cast<double*>(p.events) + ((size_t)img * p.event_capacity + slot) * 8;
    ev[0] = r.px;
    ev[1] = r.py;
    ev[2] = r.pz;
    ev[3] = r.dx;
    ev[4] = r.dy;
    ev[5] = r.dz;
    ev[6] = e;
    ev[7] = g;
}

extern "C" __global__ void scatter_mc(const ScatterParams p) {
    const int img = blockIdx.y;
    const double* cam = reinterpret_cast<const double*>(p.cams) + (size_t)img * SCATTER_CAM_STRIDE;
    const u32* kw = reinterpret_cast<const u32*>(p.keys) + 4 * img;
    const uint2 key = make_uint2(kw[0], kw[1]);
    const u32 image = kw[2];
    float* tally = reinterpret_cast<float*>(p.tally) + (size_t)img * 4 * p.Ht * p.Wt;
    const float* dens = reinterpret_cast<const float*>(p.dens);
    const double* mu = reinterpret_cast<const double*>(p.mu);
    const double* majorant = reinterpret_cast<const double*>(p.majorant);
    const double* spec_kev = reinterpret_cast<const double*>(p.spec_kev);
    const double* spec_cdf = reinterpret_cast<const double*>(p.spec_cdf);
    const double* Mi = cam + 19;
    Book book = {0.0, 0.0, 0.0, 0.0, 0ull, 0ull, 0ull};

    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 photon = (u64)blockIdx.x * blockDim.x + threadIdx.x; photon < (u64)p.photons; photon += stride) {
        u32 draw = 0u;
        Block4 u = draw_block(photon, draw, key, image);
        int b = 0;  // first bin with cdf > u0 (searchsorted right)
        while (b < p.NB && spec_cdf[b] <= u.u0) ++b;
        b = min(b, p.NB - 1);
        double e = spec_kev[b];
        const double px = -0.5 + (double)p.W * u.u1;
        const double py = -0.5 + (double)p.H * u.u2;
        Ray r;
        r.px = cam[28];
        r.py = cam[29];
        r.pz = cam[30];
        double dx = px * Mi[0] + py * Mi[1] + Mi[2];
        double dy = px * Mi[3] + py * Mi[4] + Mi[5];
        double dz = px * Mi[6] + py * Mi[7] + Mi[8];
        const double dn = sqrt(dx * dx + dy * dy + dz * dz);
        r.dx = dx / dn;
        r.dy = dy / dn;
        r.dz = dz / dn;
        double g = 1.0;
        if (p.solid_angle) {
            const double c = r.dx * cam[6] + r.dy * cam[7] + r.dz * cam[8];
            g = c * c * c;
        }
        book.emitted += g * e;
        if (e < p.cutoff_kev) {  // below the cutoff: absorbed at once, not transported
            book.deposited += g * e;
            continue;
        }
        double t_in, t_out;
        box_interval(r, p, t_in, t_out);
        const double t0 = fmax(t_in, 0.0);
        if (!(t_out > t0)) {
            detect(r, e, g, false, cam, p, book, tally);
            continue;
        }
        r.px += t0 * r.dx;
        r.py += t0 * r.dy;
        r.pz += t0 * r.dz;
        double remaining = t_out - t0;
        bool scattered = false;
        for (;;) {
            u = draw_block(photon, draw, key, image);
            const double mu_max = interp_energy(majorant, e, p);
            const double step = -log(u.u0) / mu_max;
            if (step >= remaining) {
                r.px += remaining * r.dx;
                r.py += remaining * r.dy;
                r.pz += remaining * r.dz;
                detect(r, e, g, scattered, cam, p, book, tally);
                break;
            }
            r.px += step * r.dx;
            r.py += step * r.dy;
            r.pz += step * r.dz;
            remaining -= step;
            const float* vox = nearest_voxel(dens, r.px, r.py, r.pz, p);
            const EnergyCell ce = energy_cell(e, p);
            const double mu_local = local_mu(vox, mu, ce, p);
            if (!(u.u1 * mu_max < mu_local)) continue;  // virtual collision
            if (p.forced) record_event(r, e, g, img, p);
            const double target = u.u2 * mu_local;
            double c = 0.0;
            int chosen = 3 * p.M - 1;
            for (int mq = 0; mq < 3 * p.M; ++mq) {
                const int m = mq / 3;
                c += (double)vox[m] * at_cell(mu + (size_t)mq * p.NE, ce) / 10.0;
                if (c > target) {
                    chosen = mq;
                    break;
                }
            }
            const int material = chosen / 3;
            const int kind = chosen % 3;
            if (kind == 0) {
                book.photo += 1ull;
                book.deposited += g * e;
                break;
            }
            double cos_t;
            if (kind == 1) {
                book.compton += 1ull;
                double ratio;
                sample_compton(e, material, photon, draw, key, image, p, cos_t, ratio);
                const double e_new = e * ratio;
                book.deposited += g * (e - e_new);
                e = e_new;
            } else {
                book.rayleigh += 1ull;
                cos_t = sample_rayleigh(e, material, photon, draw, key, image, p);
            }
            rotate(r, cos_t, TWO_PI * u.u3);
            scattered = true;
            double ti, to;
            box_interval(r, p, ti, to);
            remaining = fmax(to, 0.0);
            if (e < p.e0 || e < p.cutoff_kev) {
                book.deposited += g * e;
                break;
            }
        }
    }
    double* en = reinterpret_cast<double*>(p.energy) + 4 * img;
    atomicAdd(en + 0, book.emitted);
    atomicAdd(en + 1, book.deposited);
    atomicAdd(en + 2, book.escaped);
    atomicAdd(en + 3, book.detected);
    u64* ic = reinterpret_cast<u64*>(p.interactions) + 3 * img;
    atomicAdd(ic + 0, book.photo);
    atomicAdd(ic + 1, book.compton);
    atomicAdd(ic + 2, book.rayleigh);
}

// ------------------------------------------------------------------------------- forced detection
// The GPU twin of drrfarm/scatter/forced.py (score_events): one thread per tally bin (blockDim.x = Ht Wt),
// each block walks collisions ev = blockIdx.x, + gridDim.x, ... of image blockIdx.y and adds each one's
// expected scatter on its bin (Compton and Rayleigh over every material, the transmission from the collision
// to the bin's centre at the scattered energy, the bin's solid angle and the detector weight); one float
// atomic per bin and block at the end. All arithmetic in float64, in the reference's order.

__device__ __forceinline__ double form_factor_sq(const double* cdf, double x, const ScatterParams& p) {
    int j = (int)floor(x / p.x_step);
    j = min(max(j, 0), p.NX - 2);
    const double s0 = (p.x_step * j) * (p.x_step * j);
    const double s1 = (p.x_step * (j + 1)) * (p.x_step * (j + 1));
    return (cdf[j + 1] - cdf[j]) / (s1 - s0);
}

__device__ __forceinline__ double detector_weight(double e, bool signal, const ScatterParams& p) {
    const double eta = interp_energy(reinterpret_cast<const double*>(p.eta), e, p);
    if (!signal) return eta / p.count_norm;
    return (p.signal_per_photon ? e * eta : eta) / p.signal_norm;
}

// Line integrals of the NM materials' densities from (pi0, pj0, pk0) along (di, dj, dk) (index space per mm):
// midpoints of n steps of h mm from t0, nearest voxel. NM is a template constant so that the sums stay in
// registers (a runtime-sized array would live in local memory and cost a round trip per step).
template <int NM>
__device__ __forceinline__ void march(const float* __restrict__ dens, const ScatterParams& p, double pi0, double pj0,
                                      double pk0, double di, double dj, double dk, double t0, double h, long long n,
                                      double* lines) {
    double acc[NM];
#pragma unroll
    for (int m = 0; m < NM; ++m) acc[m] = 0.0;
#pragma unroll 4
    for (long long s = 0; s < n; ++s) {  // unrolled: the steps' loads do not depend on each other
        const double tt = t0 + ((double)s + 0.5) * h;
        const int i = min(max((int)floor(pi0 + tt * di + 0.5), 0), p.I - 1);
        const int j = min(max((int)floor(pj0 + tt * dj + 0.5), 0), p.J - 1);
        const int k = min(max((int)floor(pk0 + tt * dk + 0.5), 0), p.K - 1);
        const float* w = dens + (((size_t)i * p.J + j) * p.K + k) * NM;
#pragma unroll
        for (int m = 0; m < NM; ++m) acc[m] += (double)__ldg(w + m) * h;
    }
#pragma unroll
    for (int m = 0; m < NM; ++m) lines[m] = acc[m];
}

extern "C" __global__ void scatter_forced(const ScatterParams p) {
    const int img = blockIdx.y;
    const int bins = p.Ht * p.Wt;
    const int bin = threadIdx.x;
    if (bin >= bins) return;
    const double* cam = reinterpret_cast<const double*>(p.cams) + (size_t)img * SCATTER_CAM_STRIDE;
    const float* dens = reinterpret_cast<const float*>(p.dens);
    const double* mu = reinterpret_cast<const double*>(p.mu);
    const double* norms = reinterpret_cast<const double*>(p.forced_norms);
    const double* A = p.ijk_from_world;
    const u64 recorded = reinterpret_cast<const u64*>(p.event_counts)[img];
    const u64 n_events = recorded < (u64)p.event_capacity ? recorded : (u64)p.event_capacity;
    const double* events = reinterpret_cast<const double*>(p.events) + (size_t)img * p.event_capacity * 8;

    // the bin's centre on the panel (world) and the panel's normal; one bin's area
    const double sdd = cam[18];
    const double K00 = cam[12], K01 = cam[13], K02 = cam[14], K11 = cam[16], K12 = cam[17];
    const int bu = bin % p.Wt, bv = bin / p.Wt;
    const double u = ((double)bu + 0.5) * ((double)p.W / (double)p.Wt) - 0.5;
    const double v = ((double)bv + 0.5) * ((double)p.H / (double)p.Ht) - 0.5;
    const double Y = (v - K12) * sdd / K11;
    const double X = ((u - K02) * sdd - K01 * Y) / K00;
    const double* R = cam;
    const double cx = X - cam[9], cy = Y - cam[10], cz = sdd - cam[11];
    const double qx = R[0] * cx + R[3] * cy + R[6] * cz;  // R^T (c - t)
    const double qy = R[1] * cx + R[4] * cy + R[7] * cz;
    const double qz = R[2] * cx + R[5] * cy + R[8] * cz;
    const double nx = R[6], ny = R[7], nz = R[8];
    const double area = sdd * sdd / (K00 * K11) * ((double)p.W / (double)p.Wt) * ((double)p.H / (double)p.Ht);

    double acc_sig = 0.0, acc_cnt = 0.0;
    double lines[8];  // per material line integral (M <= 8, checked by the host)
    for (u64 ev = blockIdx.x; ev < n_events; ev += gridDim.x) {
        const double* E8 = events + ev * 8;
        const double px = E8[0], py = E8[1], pz = E8[2];
        const double ddx = E8[3], ddy = E8[4], ddz = E8[5];
        const double e = E8[6], g = E8[7];
        // the collision's voxel and the chance of each scatter there
        const float* vox = nearest_voxel(dens, px, py, pz, p);
        const EnergyCell ce = energy_cell(e, p);
        const double mu_local = local_mu(vox, mu, ce, p);
        if (!(mu_local > 0.0)) continue;
        // the line to the bin
        double vx = qx - px, vy = qy - py, vz = qz - pz;
        const double dist = sqrt(vx * vx + vy * vy + vz * vz);
        vx /= dist;
        vy /= dist;
        vz /= dist;
        const double d_omega = area * fmax(vx * nx + vy * ny + vz * nz, 0.0) / (dist * dist);
        double cos_t = ddx * vx + ddy * vy + ddz * vz;
        cos_t = fmin(fmax(cos_t, -1.0), 1.0);
        // line integrals through the volume: midpoints of ceil(L / step) equal steps, nearest voxel
        Ray ray;
        ray.px = px;
        ray.py = py;
        ray.pz = pz;
        ray.dx = vx;
        ray.dy = vy;
        ray.dz = vz;
        double t_in, t_out;
        box_interval(ray, p, t_in, t_out);
        const double t0 = fmax(t_in, 0.0);
        const double t1 = fmin(t_out, dist);
        const double span = t1 > t0 ? t1 - t0 : 0.0;
        const long long n = (long long)ceil(span / p.forced_step_mm);
        const double h = n > 0 ? span / (double)n : 0.0;
        const double pi0 = A[0] * px + A[1] * py + A[2] * pz + A[3];
        const double pj0 = A[4] * px + A[5] * py + A[6] * pz + A[7];
        const double pk0 = A[8] * px + A[9] * py + A[10] * pz + A[11];
        const double di = A[0] * vx + A[1] * vy + A[2] * vz;
        const double dj = A[4] * vx + A[5] * vy + A[6] * vz;
        const double dk = A[8] * vx + A[9] * vy + A[10] * vz;
        switch (p.M) {
            case 1: march<1>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
            case 2: march<2>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
            case 3: march<3>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
            case 4: march<4>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
            case 5: march<5>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
            case 6: march<6>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
            case 7: march<7>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
            default: march<8>(dens, p, pi0, pj0, pk0, di, dj, dk, t0, h, n, lines); break;
        }
        // Compton: E' on this line; Rayleigh: E
        const double eps = 1.0 / (1.0 + e / ELECTRON_REST_ENERGY_KEV * (1.0 - cos_t));
        const double e_c = e * eps;
        const double x = e / HC_KEV_ANGSTROM * sqrt(fmax(0.5 * (1.0 - cos_t), 0.0));
        const double kn_shape = eps * eps * (eps + 1.0 / eps - (1.0 - cos_t * cos_t));
        const double ray_shape = 0.5 * (1.0 + cos_t * cos_t);
        const EnergyCell cc = energy_cell(e_c, p);
        double tau_c = 0.0, tau_r = 0.0, pc = 0.0, pr = 0.0;
        for (int m = 0; m < p.M; ++m) {
            const double* r0 = mu + ((size_t)m * 3 + 0) * p.NE;
            const double* r1 = mu + ((size_t)m * 3 + 1) * p.NE;
            const double* r2 = mu + ((size_t)m * 3 + 2) * p.NE;
            const double mu_c = at_cell(r0, cc) + at_cell(r1, cc) + at_cell(r2, cc);
            const double mu_r = at_cell(r0, ce) + at_cell(r1, ce) + at_cell(r2, ce);
            tau_c += mu_c / 10.0 * lines[m];
            tau_r += mu_r / 10.0 * lines[m];
            const double rho = (double)vox[m];
            const double p_c = rho * at_cell(r1, ce) / 10.0 / mu_local;
            const double p_r = rho * at_cell(r2, ce) / 10.0 / mu_local;
            const double s = interp_x(reinterpret_cast<const double*>(p.compton_s) + (size_t)m * p.NX, x, p);
            const double f2 = form_factor_sq(reinterpret_cast<const double*>(p.rayleigh_cdf) + (size_t)m * p.NX, x, p);
            pc += p_c * kn_shape * s / at_cell(norms + (size_t)m * p.NE, ce);
            pr += p_r * f2 * ray_shape / at_cell(norms + ((size_t)p.M + m) * p.NE, ce);
        }
        const double wgt = g * d_omega;
        const double sc = wgt * pc * exp(-tau_c);
        const double sr = wgt * pr * exp(-tau_r);
        acc_sig += sc * detector_weight(e_c, true, p) + sr * detector_weight(e, true, p);
        acc_cnt += sc * detector_weight(e_c, false, p) + sr * detector_weight(e, false, p);
    }
    float* tally = reinterpret_cast<float*>(p.tally) + (size_t)img * 4 * bins;
    atomicAdd(tally + bin, (float)acc_sig);
    atomicAdd(tally + bins + bin, (float)acc_cnt);
}
