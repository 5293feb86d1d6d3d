/* quants_avx512.h: the quantized row products of quants.h in AVX-512, 16 weights at a time.

The same weights as quants.h's unpack_* (each a product of a scale and a small integer, exact in fp32, then one
rounding where gguf's code rounds: a fused multiply-add of an exact product), multiply-added into fp32 sums; only the
order of the sum differs. Used where the compiler targets AVX-512 (-march=native on such a CPU).
*/
#ifndef MT_QUANTS_AVX512_H
#define MT_QUANTS_AVX512_H

#include <immintrin.h>
#include <stdint.h>

/* 16 bytes -> 16 floats */
static inline __m512 u8_to_f32(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }
static inline __m512 s8_to_f32(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); }
static inline __m128i load16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
static inline __m128i low_nibbles(__m128i b) { return _mm_and_si128(b, _mm_set1_epi8(0x0F)); }
static inline __m128i high_nibbles(__m128i b) { return _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F)); }

/* A row's block scales, converted from fp16 once, before the vector loop: the loop then broadcasts each from memory
   (a load) instead of converting and broadcasting it (two shuffles on the port the permutes need). */
#define MT_MAX_BLOCKS 4096                   /* rows of up to 65536 weights (quantized.MAX_COLS) */

static inline void row_halves(const uint8_t *row, int64_t n_blocks, int block_bytes, int offset, float *out) {
    for (int64_t b = 0; b < n_blocks; b++) out[b] = mt_load_half(row + b * block_bytes + offset);
}

/* Q8_0: the block's 32 exact integer products q x summed first, then scaled by d once (one multiply fewer per 16
   weights than scaling each weight: the same exact weights d q, summed in another order) */
static inline float dot_q8_0(const uint8_t *row, const float *x, int64_t n) {
    float d[MT_MAX_BLOCKS];
    row_halves(row, n / 32, 34, 0, d);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t b = 0; b + 1 < n / 32; b += 2, row += 68) {          /* two blocks an iteration */
        __m512 s0 = _mm512_mul_ps(s8_to_f32(load16(row + 2)), _mm512_loadu_ps(x + 32 * b));
        __m512 s1 = _mm512_mul_ps(s8_to_f32(load16(row + 36)), _mm512_loadu_ps(x + 32 * b + 32));
        s0 = _mm512_fmadd_ps(s8_to_f32(load16(row + 18)), _mm512_loadu_ps(x + 32 * b + 16), s0);
        s1 = _mm512_fmadd_ps(s8_to_f32(load16(row + 52)), _mm512_loadu_ps(x + 32 * b + 48), s1);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), s0, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(d[b + 1]), s1, a1);
    }
    if ((n / 32) % 2) {                                                  /* an odd last block */
        int64_t b = n / 32 - 1;
        __m512 s0 = _mm512_mul_ps(s8_to_f32(load16(row + 2)), _mm512_loadu_ps(x + 32 * b));
        s0 = _mm512_fmadd_ps(s8_to_f32(load16(row + 18)), _mm512_loadu_ps(x + 32 * b + 16), s0);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), s0, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* The 16 bytes of 32 packed 4-bit values as two vectors of 16 indices: low nibbles (weights 0..15) and high nibbles
   (16..31). A permute reads only the low 4 bits of each index, so the low half needs no mask. */
static inline void nibble_indices(const uint8_t *p, __m512i *low, __m512i *high) {
    __m512i bytes = _mm512_cvtepu8_epi32(load16(p));
    *low = bytes;
    *high = _mm512_srli_epi32(bytes, 4);
}

/* A 4-bit block has only 16 distinct weights: make them once (w_k for k = 0..15, each exactly gguf's value), then look
   each weight up in that table with one permute instead of converting and scaling it. */
static const float FOUR_BITS[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline float dot_q4_0(const uint8_t *row, const float *x, int64_t n) {
    float d[MT_MAX_BLOCKS];
    row_halves(row, n / 32, 18, 0, d);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 minus_8 = _mm512_sub_ps(_mm512_loadu_ps(FOUR_BITS), _mm512_set1_ps(8.f));     /* k - 8, exact */
    for (int64_t b = 0; b < n / 32; b++, row += 18) {
        __m512 table = _mm512_mul_ps(_mm512_set1_ps(d[b]), minus_8);                        /* d (k - 8) */
        __m512i low, high;
        nibble_indices(row + 2, &low, &high);
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(low, table), _mm512_loadu_ps(x + 32 * b), a0);
        a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(high, table), _mm512_loadu_ps(x + 32 * b + 16), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static inline float dot_q4_1(const uint8_t *row, const float *x, int64_t n) {
    float d[MT_MAX_BLOCKS], m[MT_MAX_BLOCKS];
    row_halves(row, n / 32, 20, 0, d);
    row_halves(row, n / 32, 20, 2, m);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), k = _mm512_loadu_ps(FOUR_BITS);
    for (int64_t b = 0; b < n / 32; b++, row += 20) {
        __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), k, _mm512_set1_ps(m[b]));      /* d k + m */
        __m512i low, high;
        nibble_indices(row + 4, &low, &high);
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(low, table), _mm512_loadu_ps(x + 32 * b), a0);
        a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(high, table), _mm512_loadu_ps(x + 32 * b + 16), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static inline float dot_q4_k(const uint8_t *row, const float *x, int64_t n) {
    float scale[MT_MAX_BLOCKS], min[MT_MAX_BLOCKS];                  /* d sc and dmin m, one per 32 weights */
    for (int64_t b = 0; b < n / 256; b++) {
        const uint8_t *block = row + 144 * b;
        float d = mt_load_half(block), dmin = mt_load_half(block + 2);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            q4_k_scale_min(block + 4, j, &sc, &m);
            scale[8 * b + j] = d * (float)sc;
            min[8 * b + j] = dmin * (float)m;
        }
    }
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), k = _mm512_loadu_ps(FOUR_BITS);
    for (int64_t chunk = 0; chunk < n / 64; chunk++) {              /* 64 weights: two sub-blocks, 32 bytes */
        const uint8_t *q = row + 144 * (chunk / 4) + 16 + 32 * (chunk % 4);
        const float *xc = x + 64 * chunk;
        /* (d sc) k - dmin m for the chunk's two sub-blocks */
        __m512 low_table = _mm512_fmsub_ps(_mm512_set1_ps(scale[2 * chunk]), k, _mm512_set1_ps(min[2 * chunk]));
        __m512 high_table = _mm512_fmsub_ps(_mm512_set1_ps(scale[2 * chunk + 1]), k, _mm512_set1_ps(min[2 * chunk + 1]));
        for (int h = 0; h < 2; h++) {                                  /* 16 bytes at a time */
            __m512i low, high;
            nibble_indices(q + 16 * h, &low, &high);
            a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(low, low_table), _mm512_loadu_ps(xc + 16 * h), a0);
            a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(high, high_table), _mm512_loadu_ps(xc + 32 + 16 * h), a1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* 16 six-bit values: 4 low bits from `low` (>> shift_low), 2 high bits from `high` (>> shift_high), minus 32 */
static inline __m512 q6_values(__m128i low, int shift_low, __m128i high, int shift_high) {
    __m128i lo = shift_low ? high_nibbles(low) : low_nibbles(low);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(high, shift_high), _mm_set1_epi8(3));
    __m128i q = _mm_or_si128(lo, _mm_slli_epi16(hi, 4));                    /* 0..63, no carry between bytes */
    return _mm512_sub_ps(u8_to_f32(q), _mm512_set1_ps(32.f));
}

static inline float dot_q6_k(const uint8_t *row, const float *x, int64_t n) {
    float s[MT_MAX_BLOCKS];                                               /* d * scale, one per 16 weights */
    for (int64_t b = 0; b < n / 256; b++) {
        float d = mt_load_half(row + 210 * b + 208);
        for (int j = 0; j < 16; j++) s[16 * b + j] = d * (float)((const int8_t *)(row + 210 * b + 192))[j];
    }
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t start = 0; start < n; start += 256, row += 210) {
        const float *sc = s + start / 16;
        for (int half = 0; half < 2; half++, sc += 8) {
            const uint8_t *ql = row + 64 * half, *qh = row + 128 + 32 * half;
            const float *xh = x + start + 128 * half;
            for (int part = 0; part < 2; part++) {                         /* weights 16 part .. 16 part + 15 */
                __m128i l0 = load16(ql + 16 * part), l1 = load16(ql + 32 + 16 * part), h = load16(qh + 16 * part);
                const float *xp = xh + 16 * part;
                __m512 w1 = _mm512_mul_ps(_mm512_set1_ps(sc[part]), q6_values(l0, 0, h, 0));
                __m512 w2 = _mm512_mul_ps(_mm512_set1_ps(sc[2 + part]), q6_values(l1, 0, h, 2));
                __m512 w3 = _mm512_mul_ps(_mm512_set1_ps(sc[4 + part]), q6_values(l0, 4, h, 4));
                __m512 w4 = _mm512_mul_ps(_mm512_set1_ps(sc[6 + part]), q6_values(l1, 4, h, 6));
                a0 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp), a0);
                a1 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp + 32), a1);
                a0 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp + 64), a0);
                a1 = _mm512_fmadd_ps(w4, _mm512_loadu_ps(xp + 96), a1);
            }
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

#endif
