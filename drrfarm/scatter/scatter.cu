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

__device__ __forceinline__ double interp_energy(const double* t, double e, const ScatterParams& p) {
    double f = (e - p.e0) / p.de;
    f = fmin(fmax(f, 0.0), (double)p.NE - 1.000001);
    const int i = (int)f;
    const double w = f - (double)i;
    return t[i] * (1.0 - w) + t[i + 1] * w;
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
    const double* A = p.ijk_from_world;
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
            const double fi = A[0] * r.px + A[1] * r.py + A[2] * r.pz + A[3];
            const double fj = A[4] * r.px + A[5] * r.py + A[6] * r.pz + A[7];
            const double fk = A[8] * r.px + A[9] * r.py + A[10] * r.pz + A[11];
            const int i = min(max((int)floor(fi + 0.5), 0), p.I - 1);
            const int j = min(max((int)floor(fj + 0.5), 0), p.J - 1);
            const int k = min(max((int)floor(fk + 0.5), 0), p.K - 1);
            const float* vox = dens + (((size_t)i * p.J + j) * p.K + k) * p.M;
            // local attenuation: the same sums, in the same order, as the reference's cumsum
            double fe = (e - p.e0) / p.de;
            fe = fmin(fmax(fe, 0.0), (double)p.NE - 1.000001);
            const int ie = (int)fe;
            const double we = fe - (double)ie;
            double mu_local = 0.0;
            for (int m = 0; m < p.M; ++m) {
                const double rho = (double)vox[m];
                for (int q = 0; q < 3; ++q) {
                    const double* row = mu + ((size_t)m * 3 + q) * p.NE;
                    mu_local += rho * (row[ie] * (1.0 - we) + row[ie + 1] * we) / 10.0;
                }
            }
            if (!(u.u1 * mu_max < mu_local)) continue;  // virtual collision
            const double target = u.u2 * mu_local;
            double c = 0.0;
            int chosen = 3 * p.M - 1;
            for (int mq = 0; mq < 3 * p.M; ++mq) {
                const int m = mq / 3;
                const double* row = mu + (size_t)mq * p.NE;
                c += (double)vox[m] * (row[ie] * (1.0 - we) + row[ie + 1] * we) / 10.0;
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
            if (e < p.e0) {
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
