/* A decoder layer's element-wise ops for CPU (fp32), compiled at first use by
 * cpu_kernels/__init__.py: the residual add with the RMSNorm after it, SiLU(gate) * up, and
 * the rotary rotation of the query and key heads.
 *
 * Why: at decode's few rows each of these is a chain of torch ops over a few kilobytes, each
 * paying torch's dispatch. On stop 15's 2-core Xeon, 30 layers of them at 32 rows took 17.4 ms
 * in torch and 8.0 ms here (at 1,024 rows: 224 and 113 ms). Here each is one call, one pass
 * over its rows; rows are split across torch's OpenMP threads only when there is enough work
 * to pay for the fork.
 *
 * Rounding. The rotation is the reference's arithmetic, x * cos + rotate_half(x) * sin, each
 * product and the sum rounded once, so it matches torch bitwise: nothing here may be fused
 * into a multiply-add (the pragma below, and -ffp-contract=off from the loader, for compilers
 * such as clang that contract by default). The norm's sum of squares and SiLU's exponential
 * round differently from torch's kernels, within a few ulp, as two BLAS libraries' matmuls
 * do (SiLU of a gate between -88.72 and -88.38 is -0 here, a few 1e-37 in torch).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "exp_poly.h"

#pragma STDC FP_CONTRACT OFF

/* Floats a call must touch before it is split across threads: below this the fork and join
 * of torch's OpenMP team cost more than the other threads save. */
#define PARALLEL_MIN_FLOATS 32768

/* e^x in fp32 over the whole range (see exp_poly.h). Inputs are clamped to [-87, 89]: e^-87
 * is still a normal float, and from x = 88.38 on n is 128, whose exponent bits are +inf's,
 * as e^x overflows to +inf from 88.72 (so SiLU of a gate below -88.72 is -0, as torch's). A
 * NaN becomes the lower bound; SiLU's division by the result keeps its NaN. The vector
 * version below takes the same steps in the same order (products and sums rounded apart, no
 * fused multiply-add), so every lane agrees with this one bit for bit. */
#define EXP_LO -87.0f
#define EXP_HI 89.0f
static const float EXP_C[6] = {EXP_C6, EXP_C5, EXP_C4, EXP_C3, EXP_C2, EXP_C1};

static inline float exp_clamped(float x) {
    /* fmaxf returns its other operand for a NaN: the conversion to int below stays defined. */
    x = fminf(fmaxf(x, EXP_LO), EXP_HI);
    const float n = floorf(x * LOG2E + 0.5f);
    const float r = (x - n * LN2_HI) - n * LN2_LO;
    float p = EXP_C[0];
    for (int i = 1; i < 6; i++) p = p * r + EXP_C[i];
    p = (p * (r * r) + r) + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

static inline float silu_times(float g, float u) { return g / (1.0f + exp_clamped(-g)) * u; }

/* One vector body for AVX-512 (16 lanes) and AVX2 (8): V(op) names the width's intrinsic,
 * v_floor and v_pow2 the two steps whose intrinsics differ by more than the prefix. */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vfloat;
#define V(op) _mm512_##op
static inline vfloat v_floor(vfloat x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
/* 2^n for integral n, through the exponent bits. */
static inline vfloat v_pow2(vfloat n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
#define LANES 8
typedef __m256 vfloat;
#define V(op) _mm256_##op
static inline vfloat v_floor(vfloat x) { return _mm256_floor_ps(x); }
static inline vfloat v_pow2(vfloat n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

/* silu(g) * u on LANES lanes: exp_clamped's steps and silu_times's. */
static inline vfloat silu_times_v(vfloat g, vfloat u) {
    vfloat x = V(sub_ps)(V(setzero_ps)(), g);
    /* max/min return their second operand when either is NaN: a NaN becomes EXP_LO, as in
     * exp_clamped. */
    x = V(min_ps)(V(max_ps)(x, V(set1_ps)(EXP_LO)), V(set1_ps)(EXP_HI));
    const vfloat n = v_floor(V(add_ps)(V(mul_ps)(x, V(set1_ps)(LOG2E)), V(set1_ps)(0.5f)));
    vfloat r = V(sub_ps)(x, V(mul_ps)(n, V(set1_ps)(LN2_HI)));
    r = V(sub_ps)(r, V(mul_ps)(n, V(set1_ps)(LN2_LO)));
    vfloat p = V(set1_ps)(EXP_C[0]);
    for (int i = 1; i < 6; i++) p = V(add_ps)(V(mul_ps)(p, r), V(set1_ps)(EXP_C[i]));
    p = V(add_ps)(V(add_ps)(V(mul_ps)(p, V(mul_ps)(r, r)), r), V(set1_ps)(1.0f));
    const vfloat ex = V(mul_ps)(p, v_pow2(n));
    return V(mul_ps)(V(div_ps)(g, V(add_ps)(V(set1_ps)(1.0f), ex)), u);
}
#endif

/* residual[r] += x[r] (x's rows x_stride floats apart), then
 * out[r] = weight * (residual[r] / sqrt(mean(residual[r]^2) + eps)). With x NULL, only the
 * norm. residual and out: contiguous [rows, dim]. */
void add_rms_norm(const float *x, int64_t x_stride, float *residual, const float *weight,
                  float *out, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for if (rows * dim >= PARALLEL_MIN_FLOATS) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *res = residual + r * dim;
        float sum = 0.0f;
        if (x != NULL) {
            const float *xr = x + r * x_stride;
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < dim; d++) {
                const float s = res[d] + xr[d];
                res[d] = s;
                sum += s * s;
            }
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < dim; d++) sum += res[d] * res[d];
        }
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        float *o = out + r * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) o[d] = weight[d] * (res[d] * inv);
    }
}

/* out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]; gate_up [rows, 2 * inter] and
 * out [rows, inter], both contiguous. */
void silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inter) {
#pragma omp parallel for if (rows * inter >= PARALLEL_MIN_FLOATS) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * inter;
        const float *u = g + inter;
        float *o = out + r * inter;
        int64_t j = 0;
#if defined(LANES)
        for (; j + LANES <= inter; j += LANES)
            V(storeu_ps)(o + j, silu_times_v(V(loadu_ps)(g + j), V(loadu_ps)(u + j)));
#endif
        for (; j < inter; j++) o[j] = silu_times(g[j], u[j]);
    }
}

/* out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t] for the first `heads` heads
 * of each token; x's tokens are x_stride floats apart (a view of the fused q/k/v
 * projection), out is contiguous [tokens, heads, head_dim], cos and sin contiguous
 * [tokens, head_dim] (the rows of the tokens' positions). */
void rotary(const float *x, int64_t x_stride, const float *cos_rows, const float *sin_rows,
            float *out, int64_t tokens, int64_t heads, int64_t head_dim) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for if (tokens * heads * head_dim >= PARALLEL_MIN_FLOATS) \
    schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_rows + t * head_dim;
        const float *s = sin_rows + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + h * head_dim;
            float *o = out + (t * heads + h) * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < half; d++) {
                const float a = xh[d] * c[d];
                const float b = -xh[d + half] * s[d];
                o[d] = a + b;
            }
#pragma omp simd
            for (int64_t d = half; d < head_dim; d++) {
                const float a = xh[d] * c[d];
                const float b = xh[d - half] * s[d];
                o[d] = a + b;
            }
        }
    }
}
