/* Paged decode attention for CPU (fp32), compiled at first use by cpu_kernels/__init__.py.
 *
 * One query token per sequence attends to that sequence's keys and values where they lie in
 * the paged pool, found through its block table: nothing is gathered or copied first. A work
 * item is one sequence: a pass over its key blocks computes every head's scores (each key
 * read once for the query heads of its group), a softmax per head, and a pass over its value
 * blocks the weighted sums. Each row is read only up to its own length, so the step moves
 * the context's bytes once. (On stop 14's Zen 4 EPYC, with the prefetches below, a batch-32
 * step takes about 1.6x as long as a plain sum reading the same blocks in order: the passes
 * read a block head by head, a strided pattern, and their arithmetic overlaps the memory's
 * latency only in part. Reading each token's row whole instead cost more arithmetic than it
 * saved.)
 *
 * AVX2/FMA intrinsics where the compiler targets them (-march=native), and AVX-512 for the
 * weighted sum of the values where it does too (a 64-float head in one pass over the rows:
 * on stop 16's Zen 4 EPYC a batch-32 step went from 27-30 ms to 24-25 ms, with bitwise the same
 * outputs; AVX-512 for the scores was no faster there), plain C otherwise. The
 * exponential is a polynomial, not a libm call: no -ffast-math (which would change the whole
 * process's floating-point mode) is needed to vectorize it. OpenMP splits the sequences
 * across torch's own threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp_poly.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define MAX_HEADS 256

/* Asks for bytes of the block after the one being read, into the outer caches (a hint of
 * locality 1: prefetcht2 on x86), a share before each head's pass. A row's blocks lie
 * anywhere in the pool, and within a block each pass reads one K/V head's slice of every
 * token (a 768-byte stride for SmolLM2), a pattern the stream prefetchers follow poorly: on
 * stop 14's AVX512 EPYC a plain sum over the blocks that way took 27 ms a decode step where a
 * sequential one took 16. With these hints the kernel went from 33-37 ms to 25-26 ms with
 * block tables in pool order and from 40-43 ms to 30 ms with shuffled ones (batch 32,
 * contexts 64-639, 30 layers' pools). Slower were: the whole next block at once, two blocks
 * ahead, a locality-3 hint (into L1), and passes that read each token's row whole. On stop
 * 15's Cascade Lake Xeon, blocks laid out head-major (each pass reading in order) ran no
 * faster than these (35.5 against 35.6 ms, same batch), at 73% of a plain sum's bandwidth. */
static inline void prefetch_block(const float *block, int64_t num_floats) {
    const char *bytes = (const char *)block;
    for (int64_t off = 0; off < num_floats * (int64_t)sizeof(float); off += 64)
        __builtin_prefetch(bytes + off, 0, 1);
}

#if defined(__AVX2__) && defined(__FMA__)
/* exp_neg on eight lanes: the same steps (fused here), so the two agree within 2 ulp. */
static inline __m256 exp_neg8(__m256 x) {
    /* Operand order: maxps returns its second operand when either is NaN; NaN stays NaN. */
    x = _mm256_max_ps(_mm256_set1_ps(EXP_FLOOR), x);
    const __m256 n = _mm256_floor_ps(
        _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_C6);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C1));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* Replaces s[0..n) by e^(s - max s) and returns 1 / their sum. */
static float softmax_row(float *s, int64_t n) {
    int64_t t = 0;
    float m = -INFINITY;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 mv = _mm256_set1_ps(-INFINITY);
    /* A NaN score must not displace a lane's maximum (maxps keeps its second operand then); the
     * exponential below turns it into a NaN output, as SDPA would. */
    for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(_mm256_loadu_ps(s + t), mv);
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
#endif
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    float sum = 0.0f;
    t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 mb = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mb));
        _mm256_storeu_ps(s + t, e);
        sv = _mm256_add_ps(sv, e);
    }
    _mm256_storeu_ps(lanes, sv);
    for (int i = 0; i < 8; i++) sum += lanes[i];
#endif
    for (; t < n; t++) {
        s[t] = exp_neg(s[t] - m);
        sum += s[t];
    }
    return 1.0f / sum;
}

/* Scores of `count` keys (rows `stride` floats apart from `k`) against the group's scaled
 * queries, into out[g * out_stride + i]. */
static void block_scores(const float *k, int64_t stride, int64_t count,
                         const float *qs, int64_t group, int64_t head_dim,
                         float *out, int64_t out_stride) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    /* Eight keys at a time, eight independent FMA chains, then one transposing reduction for
     * the eight sums (instead of a horizontal sum per key). */
    if (head_dim % 8 == 0) {
        for (; i + 8 <= count; i += 8) {
            for (int64_t g = 0; g < group; g++) {
                __m256 acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
                for (int64_t d = 0; d < head_dim; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(qs + g * head_dim + d);
                    for (int j = 0; j < 8; j++)
                        acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (i + j) * stride + d),
                                                 acc[j]);
                }
                const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]);
                const __m256 h23 = _mm256_hadd_ps(acc[2], acc[3]);
                const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]);
                const __m256 h67 = _mm256_hadd_ps(acc[6], acc[7]);
                const __m256 h0123 = _mm256_hadd_ps(h01, h23);
                const __m256 h4567 = _mm256_hadd_ps(h45, h67);
                const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                                  _mm256_permute2f128_ps(h0123, h4567, 0x31));
                _mm256_storeu_ps(out + g * out_stride + i, sums);
            }
        }
    }
#endif
    for (; i < count; i++) {
        const float *row = k + i * stride;
        for (int64_t g = 0; g < group; g++) {
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < head_dim; d++) acc += qs[g * head_dim + d] * row[d];
            out[g * out_stride + i] = acc;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* One pass of block_values over `heads` heads and `slices` slices of eight floats starting at
 * column d. Both counts are compile-time constants at every call (always inlined), so the
 * heads * slices accumulators stay in registers: a runtime bound made GCC keep them on the
 * stack, one store-to-load round trip per key on every chain. */
static inline __attribute__((always_inline)) void values_pass(
        const float *v, int64_t stride, int64_t count, const float *w, int64_t w_stride,
        float *acc, int64_t head_dim, int64_t d, const int heads, const int slices) {
    __m256 a[3][4];
    for (int k = 0; k < heads; k++)
        for (int c = 0; c < slices; c++)
            a[k][c] = _mm256_loadu_ps(acc + k * head_dim + d + 8 * c);
    for (int64_t i = 0; i < count; i++) {
        const float *row = v + i * stride + d;
        for (int k = 0; k < heads; k++) {
            const __m256 wk = _mm256_broadcast_ss(w + k * w_stride + i);
            for (int c = 0; c < slices; c++)
                a[k][c] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(row + 8 * c), a[k][c]);
        }
    }
    for (int k = 0; k < heads; k++)
        for (int c = 0; c < slices; c++)
            _mm256_storeu_ps(acc + k * head_dim + d + 8 * c, a[k][c]);
}
#endif

#if defined(__AVX512F__)
/* values_pass on sixteen-float slices: a head of 64 floats in one pass over the rows (four
 * slices), where eight-float slices take two. Each lane sums the same products in the same
 * order as there, so the outputs are bitwise the same. */
static inline __attribute__((always_inline)) void values_pass16(
        const float *v, int64_t stride, int64_t count, const float *w, int64_t w_stride,
        float *acc, int64_t head_dim, int64_t d, const int heads, const int slices) {
    __m512 a[3][4];
    for (int k = 0; k < heads; k++)
        for (int c = 0; c < slices; c++)
            a[k][c] = _mm512_loadu_ps(acc + k * head_dim + d + 16 * c);
    for (int64_t i = 0; i < count; i++) {
        const float *row = v + i * stride + d;
        __m512 vv[4];
        for (int c = 0; c < slices; c++) vv[c] = _mm512_loadu_ps(row + 16 * c);
        for (int k = 0; k < heads; k++) {
            const __m512 wk = _mm512_set1_ps(w[k * w_stride + i]);
            for (int c = 0; c < slices; c++) a[k][c] = _mm512_fmadd_ps(wk, vv[c], a[k][c]);
        }
    }
    for (int k = 0; k < heads; k++)
        for (int c = 0; c < slices; c++)
            _mm512_storeu_ps(acc + k * head_dim + d + 16 * c, a[k][c]);
}
#endif

/* acc[g * head_dim + d] += sum over the `count` values (rows `stride` floats apart from `v`)
 * of w[g * w_stride + i] * v_i[d]. */
static void block_values(const float *v, int64_t stride, int64_t count, const float *w,
                         int64_t w_stride, int64_t group, int64_t head_dim, float *acc) {
    /* Up to three heads times four slices per pass: twelve independent FMA chains (fewer would
     * wait on the FMA latency, each chain being one long sum over the keys); a head size that
     * is not a multiple of four slices finishes with single slices. */
#define VALUES_OVER_HEADS(pass, width)                                                        \
    for (int64_t g0 = 0; g0 < group; g0 += 3) {                                               \
        const int heads = group - g0 < 3 ? (int)(group - g0) : 3;                             \
        const float *wg = w + g0 * w_stride;                                                  \
        float *ag = acc + g0 * head_dim;                                                      \
        int64_t d = 0;                                                                        \
        for (; d + 4 * (width) <= head_dim; d += 4 * (width)) {                               \
            if (heads == 3) pass(v, stride, count, wg, w_stride, ag, head_dim, d, 3, 4);      \
            else if (heads == 2) pass(v, stride, count, wg, w_stride, ag, head_dim, d, 2, 4); \
            else pass(v, stride, count, wg, w_stride, ag, head_dim, d, 1, 4);                 \
        }                                                                                     \
        for (; d < head_dim; d += (width)) {                                                  \
            if (heads == 3) pass(v, stride, count, wg, w_stride, ag, head_dim, d, 3, 1);      \
            else if (heads == 2) pass(v, stride, count, wg, w_stride, ag, head_dim, d, 2, 1); \
            else pass(v, stride, count, wg, w_stride, ag, head_dim, d, 1, 1);                 \
        }                                                                                     \
    }
#if defined(__AVX512F__)
    if (head_dim % 16 == 0) {
        VALUES_OVER_HEADS(values_pass16, 16)
        return;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 8 == 0) {
        VALUES_OVER_HEADS(values_pass, 8)
        return;
    }
#endif
#undef VALUES_OVER_HEADS
    for (int64_t i = 0; i < count; i++) {
        const float *row = v + i * stride;
        for (int64_t g = 0; g < group; g++) {
            const float wi = w[g * w_stride + i];
            float *a = acc + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) a[d] += wi * row[d];
        }
    }
}

/* q [B, H, D], kv [2, num_blocks, block_size, KVH, D] (one layer), block_tables [B, max_blocks],
 * context_lens [B], out [B, H, D], scratch [B, H, max_context + 2 * D] floats.
 * Returns 0, or -1 when a shape is outside what the kernel handles or a row's context or
 * block ids fall outside its table or the pool (that row's output is then not written). */
int paged_decode_attention(const float *q, const float *kv, const int64_t *block_tables,
                           const int64_t *context_lens, float *out, float *scratch,
                           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t num_blocks,
                           int64_t max_blocks, int64_t max_context, float scale) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return -1;
    const int64_t group = num_heads / num_kv_heads;
    if (num_heads > MAX_HEADS) return -1;
    const int64_t token_stride = num_kv_heads * head_dim;  /* one token's row in a block */
    const int64_t block_stride = block_size * token_stride;
    const int64_t plane = num_blocks * block_stride;  /* K to V */
    /* The next block is prefetched in as many shares as there are K/V heads. */
    const int64_t head_share = block_size * head_dim;
    const int64_t per_seq = num_heads * (max_context + 2 * head_dim);
    int status = 0;

    /* One sequence per work item: its blocks are read whole (every K/V head), in order. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t n = context_lens[b];
        if (n < 1 || n > max_context || (n + block_size - 1) / block_size > max_blocks) {
#pragma omp atomic write
            status = -1;
            continue;
        }
        const int64_t *table = block_tables + b * max_blocks;
        const int64_t num_row_blocks = (n + block_size - 1) / block_size;
        int bad_block = 0;
        for (int64_t j = 0; j < num_row_blocks; j++)
            bad_block |= table[j] < 0 || table[j] >= num_blocks;
        if (bad_block) {
#pragma omp atomic write
            status = -1;
            continue;
        }
        float *scores = scratch + b * per_seq;  /* [H, max_context] */
        float *qbuf = scores + num_heads * max_context;  /* [H, D]: scaled queries */
        float *acc = qbuf + num_heads * head_dim;  /* [H, D]: weighted values */
        for (int64_t x = 0; x < num_heads * head_dim; x++) {
            qbuf[x] = q[b * num_heads * head_dim + x] * scale;
            acc[x] = 0.0f;
        }

        prefetch_block(kv + table[0] * block_stride, block_stride);
        for (int64_t j = 0; j < num_row_blocks; j++) {
            const int64_t t0 = j * block_size;
            const int64_t count = n - t0 < block_size ? n - t0 : block_size;
            const float *kb = kv + table[j] * block_stride;
            /* The next key block, or after the last one the first value block: a share of it
             * before each head's pass, so the requests in flight stay few. */
            const float *next = kv + (j + 1 < num_row_blocks ? table[j + 1] * block_stride
                                                             : plane + table[0] * block_stride);
            for (int64_t h = 0; h < num_kv_heads; h++) {
                prefetch_block(next + h * head_share, head_share);
                block_scores(kb + h * head_dim, token_stride, count,
                             qbuf + h * group * head_dim, group, head_dim,
                             scores + h * group * max_context + t0, max_context);
            }
        }
        /* Softmax weights, unnormalised; the sum divides the output once. */
        float inv_sum[MAX_HEADS];
        for (int64_t x = 0; x < num_heads; x++)
            inv_sum[x] = softmax_row(scores + x * max_context, n);
        /* Weighted sum of the values. */
        for (int64_t j = 0; j < num_row_blocks; j++) {
            const int64_t t0 = j * block_size;
            const int64_t count = n - t0 < block_size ? n - t0 : block_size;
            const float *vb = kv + plane + table[j] * block_stride;
            const float *next = j + 1 < num_row_blocks
                                    ? kv + plane + table[j + 1] * block_stride : NULL;
            for (int64_t h = 0; h < num_kv_heads; h++) {
                if (next) prefetch_block(next + h * head_share, head_share);
                block_values(vb + h * head_dim, token_stride, count,
                             scores + h * group * max_context + t0, max_context, group,
                             head_dim, acc + h * group * head_dim);
            }
        }
        float *o = out + b * num_heads * head_dim;
        for (int64_t x = 0; x < num_heads; x++)
            for (int64_t d = 0; d < head_dim; d++)
                o[x * head_dim + d] = acc[x * head_dim + d] * inv_sum[x];
    }
    return status;
}
