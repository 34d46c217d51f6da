/* One pass over memory per parameter for AddSign and PowerSign (sign_optim/fused.py loads this).
 *
 * For each element, with g' = maximize ? -g : g:
 *   m <- m + (1 - beta) (g' - m)                       (torch.lerp with weight 1 - beta < 0.5)
 *   p <- p (1 - lr wd)                                 (decoupled weight decay, when wd != 0)
 *   AddSign:   p <- p - lr alpha g' - lr d sign(m) |g'|
 *   PowerSign: p <- p - lr g' - lr a sign(m) |g'| - lr b |sign(m)| g'    (a = sinh(c), b = cosh(c) - 1)
 * which is the single-tensor path's arithmetic, in its order. Reads p, g, m; writes p, m: 5 floats.
 *
 * float32 and float64 parameters; float16/bfloat16 parameters keep a float32 moving average and
 * are updated in float32 (the caller passes the dtype code). The step counters of the parameters
 * (0-d float32 CPU tensors) are read (sign_read_steps) and advanced here too, so a step makes one
 * call into torch per group instead of several per parameter. The work is split into blocks of at
 * most BLOCK elements across all tensors, run by OpenMP threads (nthreads from torch). GCC's
 * target_clones compiles the loop for AVX-512, AVX2 and baseline x86-64 (feature-based dispatch)
 * and picks one at load time.
 *
 * The file is also a (trivial) Python extension module, so setuptools builds it like any other;
 * its functions are called through ctypes.
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 16384

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

enum { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };
enum { ADDSIGN = 0, POWERSIGN = 1 };

typedef struct {
    int rule;        /* ADDSIGN or POWERSIGN */
    int maximize;
    double lr, beta, weight_decay;
    double alpha;    /* AddSign's constant */
} rule_t;

static inline float sgnf(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }
static inline double sgnd(double x) { return (double)((x > 0.0) - (x < 0.0)); }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 block: the hot loop */
/* coef_a, coef_b: AddSign (d, unused); PowerSign (sinh(c), cosh(c) - 1) */
CLONES static void block_f32(float *restrict p, const float *restrict g, float *restrict m, int64_t n,
                             const rule_t *r, double coef_a, double coef_b) {
    const float w = (float)(1.0 - r->beta);
    const float keep = (float)(1.0 - r->lr * r->weight_decay);
    const int decay_wd = r->weight_decay != 0.0;
    const float neg = r->maximize ? -1.0f : 1.0f;
    if (r->rule == ADDSIGN) {
        const float c0 = (float)(-r->lr * r->alpha), c1 = (float)(-r->lr * coef_a);
        for (int64_t i = 0; i < n; i++) {
            float gi = neg * g[i];
            float mi = m[i] + w * (gi - m[i]);
            float pi = decay_wd ? p[i] * keep : p[i];
            pi = pi + c0 * gi;
            pi = pi + c1 * (sgnf(mi) * fabsf(gi));
            m[i] = mi;
            p[i] = pi;
        }
    } else {
        const float c0 = (float)(-r->lr), ca = (float)(-r->lr * coef_a), cb = (float)(-r->lr * coef_b);
        for (int64_t i = 0; i < n; i++) {
            float gi = neg * g[i];
            float mi = m[i] + w * (gi - m[i]);
            float pi = decay_wd ? p[i] * keep : p[i];
            float s = sgnf(mi);
            pi = pi + c0 * gi;
            pi = pi + ca * (s * fabsf(gi));
            pi = pi + cb * (fabsf(s) * gi);
            m[i] = mi;
            p[i] = pi;
        }
    }
}

static void block_f64(double *restrict p, const double *restrict g, double *restrict m, int64_t n,
                      const rule_t *r, double coef_a, double coef_b) {
    const double w = 1.0 - r->beta, keep = 1.0 - r->lr * r->weight_decay, neg = r->maximize ? -1.0 : 1.0;
    const int decay_wd = r->weight_decay != 0.0;
    for (int64_t i = 0; i < n; i++) {
        double gi = neg * g[i];
        double mi = m[i] + w * (gi - m[i]);
        double pi = decay_wd ? p[i] * keep : p[i];
        double s = sgnd(mi);
        if (r->rule == ADDSIGN) {
            pi = pi + (-r->lr * r->alpha) * gi;
            pi = pi + (-r->lr * coef_a) * (s * fabs(gi));
        } else {
            pi = pi + (-r->lr) * gi;
            pi = pi + (-r->lr * coef_a) * (s * fabs(gi));
            pi = pi + (-r->lr * coef_b) * (fabs(s) * gi);
        }
        m[i] = mi;
        p[i] = pi;
    }
}

/* half precision parameters: float32 moving average and float32 arithmetic, rounded once when stored */
static void block_half(void *p_, const void *g_, float *restrict m, int64_t n, int dtype,
                       const rule_t *r, double coef_a, double coef_b) {
    uint16_t *p = (uint16_t *)p_;
    const uint16_t *g = (const uint16_t *)g_;
    const float w = (float)(1.0 - r->beta), keep = (float)(1.0 - r->lr * r->weight_decay);
    const float neg = r->maximize ? -1.0f : 1.0f;
    const int decay_wd = r->weight_decay != 0.0;
    for (int64_t i = 0; i < n; i++) {
        float gi, pi;
        if (dtype == BF16) {
            gi = neg * bf16_to_f32(g[i]);
            pi = bf16_to_f32(p[i]);
        } else {
            _Float16 gh, ph;
            memcpy(&gh, &g[i], 2);
            memcpy(&ph, &p[i], 2);
            gi = neg * (float)gh;
            pi = (float)ph;
        }
        float mi = m[i] + w * (gi - m[i]);
        float s = sgnf(mi);
        if (decay_wd) pi = pi * keep;
        if (r->rule == ADDSIGN) {
            pi = pi + (float)(-r->lr * r->alpha) * gi;
            pi = pi + (float)(-r->lr * coef_a) * (s * fabsf(gi));
        } else {
            pi = pi + (float)(-r->lr) * gi;
            pi = pi + (float)(-r->lr * coef_a) * (s * fabsf(gi));
            pi = pi + (float)(-r->lr * coef_b) * (fabsf(s) * gi);
        }
        m[i] = mi;
        if (dtype == BF16) {
            p[i] = f32_to_bf16(pi);
        } else {
            _Float16 ph = (_Float16)pi;
            memcpy(&p[i], &ph, 2);
        }
    }
}

/* The entry point. Tensor k has numel[k] elements at params[k], grads[k], avgs[k] (contiguous) and
 * coefficients coef_a[k], coef_b[k] (AddSign: the decay d, unused; PowerSign: sinh(c), cosh(c) - 1).
 * Blocks of at most BLOCK elements are distributed over nthreads OpenMP threads. Returns 0. */
int sign_fused_step(int rule, int dtype, int64_t count, void **params, void **grads, void **avgs,
                    const int64_t *numel, const double *coef_a, const double *coef_b,
                    double lr, double beta, double alpha, double weight_decay, int maximize, int nthreads,
                    float **steps) {
    rule_t r = {rule, maximize, lr, beta, weight_decay, alpha};
    int64_t blocks = 0;
    for (int64_t k = 0; k < count; k++) blocks += (numel[k] + BLOCK - 1) / BLOCK;
    /* block b of the flattened list: tensor index and offset, found by a walk per thread chunk */
    int64_t *first_block = (int64_t *)PyMem_RawMalloc(sizeof(int64_t) * (size_t)(count + 1));
    if (!first_block) return 1;
    first_block[0] = 0;
    for (int64_t k = 0; k < count; k++) first_block[k + 1] = first_block[k] + (numel[k] + BLOCK - 1) / BLOCK;
    const size_t size = dtype == F64 ? 8 : dtype == F32 ? 4 : 2;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        int64_t k = 0;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            while (first_block[k + 1] <= b) k++;
            while (first_block[k] > b) k--;
            int64_t start = (b - first_block[k]) * BLOCK;
            int64_t n = numel[k] - start < BLOCK ? numel[k] - start : BLOCK;
            char *p = (char *)params[k] + start * size;
            const char *g = (const char *)grads[k] + start * size;
            double ca = coef_a[k], cb = coef_b[k];
            if (dtype == F32) {
                block_f32((float *)p, (const float *)g, (float *)avgs[k] + start, n, &r, ca, cb);
            } else if (dtype == F64) {
                block_f64((double *)p, (const double *)g, (double *)avgs[k] + start, n, &r, ca, cb);
            } else {
                block_half(p, g, (float *)avgs[k] + start, n, dtype, &r, ca, cb);
            }
        }
    }
    PyMem_RawFree(first_block);
    if (steps)  /* the step counters (0-d float32 tensors) advance here: no per-parameter torch call */
        for (int64_t k = 0; k < count; k++) *steps[k] += 1.0f;
    return 0;
}

/* out[k] = *steps[k]: the step counters of count parameters, read in one call. */
int sign_read_steps(int64_t count, float **steps, double *out) {
    for (int64_t k = 0; k < count; k++) out[k] = (double)*steps[k];
    return 0;
}

/* A plain copy of the same bytes (read p, g, m; write p, m): the bandwidth row of the benchmark. */
int sign_stream_copy(int64_t count, float **params, float **grads, float **avgs, const int64_t *numel, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (int64_t k = 0; k < count; k++) {
        float *restrict p = params[k], *restrict m = avgs[k];
        const float *restrict g = grads[k];
        for (int64_t i = 0; i < numel[k]; i++) {
            float gi = g[i];
            float pi = p[i];
            float mi = m[i];
            p[i] = mi + gi * 0.0f + pi * 0.0f;
            m[i] = pi;
        }
    }
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_kernel",
                                    "AddSign/PowerSign one-pass kernels, called through ctypes.", -1, NULL};

PyMODINIT_FUNC PyInit__fused_kernel(void) { return PyModule_Create(&module); }
