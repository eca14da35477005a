/* Causal prefill attention for CPU (fp32), compiled at first use by cpu_kernels/__init__.py.
 *
 * A chunk of n_q tokens attends causally to its sequence's n_k >= n_q keys, its own being the
 * last n_q of them (n_k = n_q for a chunk with nothing cached before it): q [n_q, H, D], k and v
 * [n_k, KVH, D], each a token's heads side by side and tokens `*_stride` floats apart (for a
 * fresh chunk the model's views, q and k into the rotary output and v into the fused QKV
 * projection, need no copy); out [n_q, H, D]. Query t sits at position n_k - n_q + t and sees
 * keys 0 .. n_k - n_q + t.
 *
 * Why not torch's SDPA: its CPU flash kernel runs a small MKL GEMM per (query block, key
 * block), and on stop 16's Zen 4 EPYC that reached about 70 GFLOP/s of causal work on
 * SmolLM2's shapes (9 query heads, 3 K/V heads, head size 64, 64-512 tokens), a third of what
 * the same CPU's GEMMs reach. Here a work item is one K/V head and BQ query tokens: its rows
 * are the group's query heads times those tokens, so each key tile is read once for the whole
 * group, and scores and the weighted sums accumulate in registers (an outer product per key
 * dimension: one query element broadcast against 16 keys). The keys are transposed once per
 * K/V head for that (kt [KVH][D][n_k rounded up to BK], from the caller's scratch). Softmax runs online, as in
 * flash attention: a running maximum and sum per row, the row's output rescaled when the
 * maximum rises, one division at the end.
 *
 * AVX-512 intrinsics where the compiler targets them and the head size is a multiple of 16;
 * the same algorithm in plain C otherwise. OpenMP splits the work items over torch's threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_poly.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BQ 16          /* query tokens per work item */
#define BK 64          /* keys per tile */
#define MAX_GROUP 8    /* query heads per K/V head */
#define MAX_DIM 128
#define MAX_ROWS (BQ * MAX_GROUP)

/* Per-thread work buffers: scaled queries, scores (then weights), outputs, running max/sum. */
typedef struct {
    float q[MAX_ROWS * MAX_DIM];
    float s[MAX_ROWS * BK];
    float o[MAX_ROWS * MAX_DIM];
    float m[MAX_ROWS];
    float l[MAX_ROWS];
} Work;
_Static_assert(sizeof(Work) % 64 == 0, "aligned_alloc needs a multiple of the alignment");

#if defined(__AVX512F__)
static inline __m512 exp_neg16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(EXP_FLOOR), x);
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_C6);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C1));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* s[r][0 .. 16 * NC) = sum over d of q[r][d] * kt[d][0 ..], four rows at a time; NC (the
 * tile's key chunks of 16 that hold keys) is a compile-time constant at every call. */
static inline __attribute__((always_inline)) void tile_scores_pass(
        const float *q, int64_t rows, int64_t dim, const float *kt, int64_t ld, float *s,
        const int nc) {
    for (int64_t r = 0; r < rows; r += 4) {
        __m512 a[4][4];
        for (int i = 0; i < 4; i++)
            for (int c = 0; c < nc; c++) a[i][c] = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d++) {
            const float *kr = kt + d * ld;
            __m512 kv[4];
            for (int c = 0; c < nc; c++) kv[c] = _mm512_loadu_ps(kr + 16 * c);
            for (int i = 0; i < 4; i++) {
                const __m512 b = _mm512_set1_ps(q[(r + i) * dim + d]);
                for (int c = 0; c < nc; c++) a[i][c] = _mm512_fmadd_ps(b, kv[c], a[i][c]);
            }
        }
        for (int i = 0; i < 4; i++)
            for (int c = 0; c < nc; c++) _mm512_storeu_ps(s + (r + i) * BK + 16 * c, a[i][c]);
    }
}

static void tile_scores_avx512(const float *q, int64_t rows, int64_t dim, const float *kt,
                               int64_t ld, int64_t count, float *s) {
    switch ((count + 15) / 16) {
        case 1: tile_scores_pass(q, rows, dim, kt, ld, s, 1); break;
        case 2: tile_scores_pass(q, rows, dim, kt, ld, s, 2); break;
        case 3: tile_scores_pass(q, rows, dim, kt, ld, s, 3); break;
        default: tile_scores_pass(q, rows, dim, kt, ld, s, 4); break;
    }
}

/* o[r][d0 .. d0 + 16 * NC) += sum over j < count of p[r][j] * v_j[d0 ..], four rows at a time;
 * NC is a compile-time constant at every call, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_values_pass(
        const float *p, int64_t rows, const float *v, int64_t stride, int64_t count,
        float *o, int64_t dim, int64_t d0, const int nc) {
    for (int64_t r = 0; r < rows; r += 4) {
        __m512 a[4][4];
        for (int i = 0; i < 4; i++)
            for (int c = 0; c < nc; c++)
                a[i][c] = _mm512_loadu_ps(o + (r + i) * dim + d0 + 16 * c);
        for (int64_t j = 0; j < count; j++) {
            const float *vr = v + j * stride + d0;
            __m512 vv[4];
            for (int c = 0; c < nc; c++) vv[c] = _mm512_loadu_ps(vr + 16 * c);
            for (int i = 0; i < 4; i++) {
                const __m512 w = _mm512_set1_ps(p[(r + i) * BK + j]);
                for (int c = 0; c < nc; c++) a[i][c] = _mm512_fmadd_ps(w, vv[c], a[i][c]);
            }
        }
        for (int i = 0; i < 4; i++)
            for (int c = 0; c < nc; c++)
                _mm512_storeu_ps(o + (r + i) * dim + d0 + 16 * c, a[i][c]);
    }
}

static void tile_values_avx512(const float *p, int64_t rows, const float *v, int64_t stride,
                               int64_t count, float *o, int64_t dim) {
    int64_t d = 0;
    for (; d + 64 <= dim; d += 64) tile_values_pass(p, rows, v, stride, count, o, dim, d, 4);
    for (; d < dim; d += 16) tile_values_pass(p, rows, v, stride, count, o, dim, d, 1);
}
#endif

static void tile_scores_plain(const float *q, int64_t rows, int64_t dim, const float *kt,
                              int64_t ld, float *s) {
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * BK;
        for (int64_t j = 0; j < BK; j++) sr[j] = 0.0f;
        for (int64_t d = 0; d < dim; d++) {
            const float qd = q[r * dim + d];
            const float *kr = kt + d * ld;
#pragma omp simd
            for (int64_t j = 0; j < BK; j++) sr[j] += qd * kr[j];
        }
    }
}

static void tile_values_plain(const float *p, int64_t rows, const float *v, int64_t stride,
                              int64_t count, float *o, int64_t dim) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < count; j++) {
            const float w = p[r * BK + j];
            const float *vr = v + j * stride;
            float *orow = o + r * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) orow[d] += w * vr[d];
        }
}

/* Turns row r's scores s[0..lim) into weights e^(s - m_new) (zero from lim to BK), folds
 * them into the running sum and rescales the row's output when its maximum rises. Scores past
 * lim (later keys, or past the tile's keys) may hold anything: they are never read. */
static void online_softmax_row(float *s, int64_t lim, float *m, float *l, float *o,
                               int64_t dim) {
    float mx = *m, sum = 0.0f;
#if defined(__AVX512F__)
    __mmask16 mask[BK / 16];
    for (int c = 0; c < BK / 16; c++) {
        const int64_t left = lim - 16 * c;
        mask[c] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    }
    /* Masked loads: chunks past the tile's keys were not written by the score pass. */
    __m512 mv = _mm512_set1_ps(mx);
    for (int c = 0; c < BK / 16; c++)
        mv = _mm512_mask_max_ps(mv, mask[c], _mm512_maskz_loadu_ps(mask[c], s + 16 * c), mv);
    mx = _mm512_reduce_max_ps(mv);
    const __m512 mb = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < BK / 16; c++) {
        const __m512 e = _mm512_maskz_mov_ps(
            mask[c], exp_neg16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask[c], s + 16 * c), mb)));
        _mm512_storeu_ps(s + 16 * c, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#else
    for (int64_t j = 0; j < lim; j++) mx = s[j] > mx ? s[j] : mx;
    for (int64_t j = 0; j < lim; j++) {
        s[j] = exp_neg(s[j] - mx);
        sum += s[j];
    }
    for (int64_t j = lim; j < BK; j++) s[j] = 0.0f;
#endif
    if (mx > *m) {
        /* The first tile finds m = -inf: the output and sum are still zero, scaled by 0. */
        const float c = expf(*m - mx);
        *l *= c;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) o[d] *= c;
        *m = mx;
    }
    *l += sum;
}

/* One work item: K/V head h, query tokens [q0, q0 + BQ) (those below n), at positions from
 * q_off + q0 on. */
static void attend_block(const float *q, int64_t q_stride, const float *kt, int64_t ld,
                         const float *v, int64_t v_stride, float *out, int64_t out_stride,
                         int64_t n, int64_t q_off, int64_t h, int64_t q0, int64_t group,
                         int64_t dim, float scale, int vec, Work *w) {
    const int64_t rows = group * BQ;  /* row g * BQ + t: query head h * group + g, token q0 + t */
    for (int64_t g = 0; g < group; g++)
        for (int64_t t = 0; t < BQ; t++) {
            float *qr = w->q + (g * BQ + t) * dim;
            if (q0 + t < n) {
                const float *src = q + (q0 + t) * q_stride + (h * group + g) * dim;
                for (int64_t d = 0; d < dim; d++) qr[d] = src[d] * scale;
            } else {
                memset(qr, 0, (size_t)dim * sizeof(float));
            }
        }
    memset(w->o, 0, (size_t)(rows * dim) * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
    }
    /* Past the block's last query position nothing is read. */
    const int64_t key_end = q_off + (q0 + BQ < n ? q0 + BQ : n);
    const float *vh = v + h * dim;
    for (int64_t k0 = 0; k0 < key_end; k0 += BK) {
        const int64_t count = key_end - k0 < BK ? key_end - k0 : BK;
#if defined(__AVX512F__)
        if (vec) tile_scores_avx512(w->q, rows, dim, kt + k0, ld, count, w->s);
        else
#endif
            tile_scores_plain(w->q, rows, dim, kt + k0, ld, w->s);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t t = r % BQ;
            /* Keys up to the row's own position (causal), within the tile. */
            int64_t lim = q_off + q0 + t - k0 + 1;
            if (lim > count) lim = count;
            if (q0 + t >= n || lim <= 0) {
                memset(w->s + r * BK, 0, BK * sizeof(float));
                continue;
            }
            online_softmax_row(w->s + r * BK, lim, &w->m[r], &w->l[r], w->o + r * dim, dim);
        }
        const float *vt = vh + k0 * v_stride;
#if defined(__AVX512F__)
        if (vec) tile_values_avx512(w->s, rows, vt, v_stride, count, w->o, dim);
        else
#endif
            tile_values_plain(w->s, rows, vt, v_stride, count, w->o, dim);
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t t = 0; t < BQ && q0 + t < n; t++) {
            const int64_t r = g * BQ + t;
            const float inv = 1.0f / w->l[r];
            float *dst = out + (q0 + t) * out_stride + (h * group + g) * dim;
            for (int64_t d = 0; d < dim; d++) dst[d] = w->o[r * dim + d] * inv;
        }
}

/* Floats of scratch the caller passes for n_k keys (the transposed keys). */
int64_t prefill_attention_scratch_numel(int64_t n_k, int64_t num_kv_heads, int64_t head_dim) {
    const int64_t n_pad = (n_k + BK - 1) / BK * BK;
    return num_kv_heads * head_dim * n_pad;
}

/* Returns 0, or -1 for a shape the kernel does not take (nothing written), -2 when a work
 * buffer could not be allocated. */
int prefill_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride,
                      const float *v, int64_t v_stride, float *out, int64_t out_stride,
                      float *scratch,
                      int64_t n_q, int64_t n_k, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, float scale) {
    if (n_q < 1 || n_k < n_q || num_kv_heads < 1 || num_heads % num_kv_heads != 0) return -1;
    const int64_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim < 1 || head_dim > MAX_DIM) return -1;
    const int64_t n_pad = (n_k + BK - 1) / BK * BK;
    int vec = 0;
#if defined(__AVX512F__)
    vec = head_dim % 16 == 0;
#endif
    /* kt[h][d][t] = k[t][h][d], zero past n_k (a tile's scores there are computed, not used). */
#pragma omp parallel for schedule(static)
    for (int64_t hd = 0; hd < num_kv_heads * head_dim; hd++) {
        const int64_t h = hd / head_dim, d = hd % head_dim;
        float *row = scratch + hd * n_pad;
        const float *src = k + h * head_dim + d;
        for (int64_t t = 0; t < n_k; t++) row[t] = src[t * k_stride];
        for (int64_t t = n_k; t < n_pad; t++) row[t] = 0.0f;
    }
    const int64_t num_blocks = (n_q + BQ - 1) / BQ;
    const int64_t num_items = num_kv_heads * num_blocks;
    int status = 0;
#pragma omp parallel
    {
        Work *w = aligned_alloc(64, sizeof(Work));
        if (w == NULL) {
#pragma omp atomic write
            status = -2;
        }
        /* Latest query blocks (the most keys) first, so the threads finish together. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_items; item++) {
            if (w == NULL) continue;
            const int64_t b = num_blocks - 1 - item / num_kv_heads;
            const int64_t h = item % num_kv_heads;
            attend_block(q, q_stride, scratch + h * head_dim * n_pad, n_pad, v, v_stride,
                         out, out_stride, n_q, n_k - n_q, h, b * BQ, group, head_dim, scale,
                         vec, w);
        }
        free(w);
    }
    return status;
}
