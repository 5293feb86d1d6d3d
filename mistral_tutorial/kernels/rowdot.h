/* rowdot.h: the dot product of one stored weight row with an fp32 vector, for each storage format.

Batch-1 decoding multiplies one vector by every weight matrix, so its speed is the speed at which the CPU reads the
weights. These functions read each weight once, in the order it lies in memory, widen it to fp32 in registers and
multiply-add it into fp32 sums: the activations stay fp32 whatever the weights are stored in (weight-only formats).
With AVX-512 (compiled with -march=native on a CPU that has it) 16 lanes at a time, else plain loops the compiler
vectorises for whatever the CPU has.
*/
#ifndef MT_ROWDOT_H
#define MT_ROWDOT_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "quants.h"

enum mt_format { MT_F32 = 0, MT_BF16 = 1, MT_Q8_0 = 2, MT_Q4_0 = 3, MT_Q4_1 = 4, MT_Q4_K = 5, MT_Q6_K = 6 };

typedef struct {
    const void *data;        /* row-major: row r starts at data + r * row_bytes */
    int64_t rows, cols;      /* (out, in) */
    int64_t row_bytes;
    int32_t format;          /* enum mt_format */
    int32_t unused;
} mt_matrix;

static inline float mt_bf16_to_f32(uint16_t h) {
    /* bf16 is the top half of an fp32: widening is exact */
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float dot_f32(const float *w, const float *x, int64_t n) {
    int64_t i = 0;
    float sum = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    #pragma omp simd reduction(+:sum)
    for (int64_t j = 0; j < n - n % 16; j++) sum += w[j] * x[j];
    i = n - n % 16;
#endif
    for (; i < n; i++) sum += w[i] * x[i];
    return sum;
}

static inline float dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    int64_t i = 0;
    float sum = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        /* 16 bf16 -> 16 fp32: zero-extend to 32 bits, shift into the high half */
        __m512i lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i))), 16);
        __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i + 16))), 16);
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(lo), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(hi), _mm512_loadu_ps(x + i + 16), a1);
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    #pragma omp simd reduction(+:sum)
    for (int64_t j = 0; j < n - n % 16; j++) sum += mt_bf16_to_f32(w[j]) * x[j];
    i = n - n % 16;
#endif
    for (; i < n; i++) sum += mt_bf16_to_f32(w[i]) * x[i];
    return sum;
}

/* weights per block and bytes per block of a quantized format (0 for fp32, bf16) */
static inline int mt_block_size(int format) {
    return format == MT_Q4_K || format == MT_Q6_K ? 256 : format >= MT_Q8_0 ? 32 : 0;
}

static inline int mt_block_bytes(int format) {
    switch (format) {
    case MT_Q8_0: return 34;
    case MT_Q4_0: return 18;
    case MT_Q4_1: return 20;
    case MT_Q4_K: return 144;
    case MT_Q6_K: return 210;
    default:      return 0;
    }
}

/* the fp32 weights of one quantized block */
static inline void mt_unpack_block(int format, const uint8_t *block, float *w) {
    switch (format) {
    case MT_Q8_0: unpack_q8_0(block, w); break;
    case MT_Q4_0: unpack_q4_0(block, w); break;
    case MT_Q4_1: unpack_q4_1(block, w); break;
    case MT_Q4_K: unpack_q4_k(block, w); break;
    default:      unpack_q6_k(block, w); break;
    }
}

/* dot of a quantized row (n weights) with x: each block unpacked into registers, then multiply-added in 16 lanes */
static inline float dot_blocks(int format, const uint8_t *row, const float *x, int64_t n) {
    int size = mt_block_size(format), bytes = mt_block_bytes(format);
    float w[256], lanes[16] = {0};
    for (int64_t start = 0; start < n; start += size, row += bytes) {
        mt_unpack_block(format, row, w);
        for (int i = 0; i < size; i += 16) {
            #pragma omp simd
            for (int l = 0; l < 16; l++) lanes[l] += w[i + l] * x[start + i + l];
        }
    }
    float sum = 0.f;
    for (int l = 0; l < 16; l++) sum += lanes[l];
    return sum;
}

/* the fp32 weights of row r of W, into out (W->cols floats) */
static inline void mt_unpack_row(const mt_matrix *w, int64_t r, float *out) {
    const uint8_t *row = (const uint8_t *)w->data + r * w->row_bytes;
    if (w->format == MT_F32) {
        memcpy(out, row, w->cols * sizeof(float));
    } else if (w->format == MT_BF16) {
        for (int64_t i = 0; i < w->cols; i++) out[i] = mt_bf16_to_f32(((const uint16_t *)row)[i]);
    } else {
        int size = mt_block_size(w->format), bytes = mt_block_bytes(w->format);
        for (int64_t start = 0; start < w->cols; start += size, row += bytes) mt_unpack_block(w->format, row, out + start);
    }
}

/* dot(row r of W, x), x holding W->cols floats */
static inline float mt_row_dot(const mt_matrix *w, int64_t r, const float *x) {
    const char *row = (const char *)w->data + r * w->row_bytes;
    switch (w->format) {
    case MT_F32:  return dot_f32((const float *)row, x, w->cols);
    case MT_BF16: return dot_bf16((const uint16_t *)row, x, w->cols);
    case MT_Q8_0: return dot_q8_0((const uint8_t *)row, x, w->cols);
    case MT_Q4_0: return dot_q4_0((const uint8_t *)row, x, w->cols);
    case MT_Q4_1: return dot_q4_1((const uint8_t *)row, x, w->cols);
    case MT_Q4_K: return dot_q4_k((const uint8_t *)row, x, w->cols);
    default:      return dot_q6_k((const uint8_t *)row, x, w->cols);
    }
}

#endif
