/* quants.h: llama.cpp's (GGML's) quantized blocks, unpacked into fp32 weights exactly as gguf.quants.dequantize does.

Each format cuts a row into blocks of 32 (or 256) weights that share a scale (and a minimum), stored in fp16:
    Q8_0  34 bytes / 32:  d, 32 int8 q                  w = d * q
    Q4_0  18 bytes / 32:  d, 16 bytes of 4-bit q        w = d * (q - 8)      (q[j] low nibble, q[j+16] high)
    Q4_1  20 bytes / 32:  d, m, 16 bytes of 4-bit q     w = d * q + m
    Q4_K 144 bytes / 256: d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of 4-bit q
                          w = (d * sc) * q - (dmin * m)
    Q6_K 210 bytes / 256: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales (one per 16), d
                          w = (d * sc) * (q - 32)
Every product of a scale and a small integer is exact in fp32 (11 + 8 bits at most), so the one rounding left is the
one gguf's numpy code also makes (the + m, the - dmin * m, and Q6_K's (d * sc) * q): the same bits. A kernel that
multiply-adds such a weight into a sum (fma) rounds it the same way too.
*/
#ifndef MT_QUANTS_H
#define MT_QUANTS_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* IEEE half -> float, exact (fp16 is a subset of fp32) */
static inline float mt_half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000 | (mantissa << 13);                     /* inf, nan */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);       /* normal: rebias 15 -> 127 */
    } else if (mantissa == 0) {
        bits = sign;                                                      /* zero */
    } else {                                                              /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float mt_load_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);                          /* the CPU's own conversion: the same exact value */
#elif defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    return mt_half_to_f32(h);
#endif
}

/* w[0..32) of one Q8_0 block */
static inline void unpack_q8_0(const uint8_t *block, float *w) {
    float d = mt_load_half(block);
    const int8_t *q = (const int8_t *)(block + 2);
    #pragma omp simd
    for (int i = 0; i < 32; i++) w[i] = (float)q[i] * d;
}

static inline void unpack_q4_0(const uint8_t *block, float *w) {
    float d = mt_load_half(block);
    const uint8_t *q = block + 2;
    #pragma omp simd
    for (int i = 0; i < 16; i++) {
        w[i] = d * (float)((int)(q[i] & 0x0F) - 8);
        w[i + 16] = d * (float)((int)(q[i] >> 4) - 8);
    }
}

static inline void unpack_q4_1(const uint8_t *block, float *w) {
    float d = mt_load_half(block), m = mt_load_half(block + 2);
    const uint8_t *q = block + 4;
    #pragma omp simd
    for (int i = 0; i < 16; i++) {
        w[i] = d * (float)(q[i] & 0x0F) + m;
        w[i + 16] = d * (float)(q[i] >> 4) + m;
    }
}

/* the 6-bit scale and min of sub-block j (0..7) of a Q4_K block's 12 scale bytes */
static inline void q4_k_scale_min(const uint8_t *s, int j, int *scale, int *min) {
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* w[0..256) of one Q4_K block: 4 chunks of 32 bytes, low nibbles a sub-block, high nibbles the next */
static inline void unpack_q4_k(const uint8_t *block, float *w) {
    float d = mt_load_half(block), dmin = mt_load_half(block + 2);
    const uint8_t *scales = block + 4, *q = block + 16;
    for (int chunk = 0; chunk < 4; chunk++) {
        int sc0, m0, sc1, m1;
        q4_k_scale_min(scales, 2 * chunk, &sc0, &m0);
        q4_k_scale_min(scales, 2 * chunk + 1, &sc1, &m1);
        float d0 = d * (float)sc0, min0 = dmin * (float)m0, d1 = d * (float)sc1, min1 = dmin * (float)m1;
        const uint8_t *qc = q + 32 * chunk;
        float *wc = w + 64 * chunk;
        #pragma omp simd
        for (int i = 0; i < 32; i++) {
            wc[i] = d0 * (float)(qc[i] & 0x0F) - min0;
            wc[i + 32] = d1 * (float)(qc[i] >> 4) - min1;
        }
    }
}

/* w[0..256) of one Q6_K block: two halves of 128, each from 64 bytes of low bits and 32 of high bits */
static inline void unpack_q6_k(const uint8_t *block, float *w) {
    const uint8_t *low = block, *high = block + 128;
    const int8_t *scales = (const int8_t *)(block + 192);
    float d = mt_load_half(block + 208);
    for (int half = 0; half < 2; half++) {
        const uint8_t *ql = low + 64 * half, *qh = high + 32 * half;
        float *wh = w + 128 * half;
        const int8_t *sc = scales + 8 * half;
        for (int i = 0; i < 32; i++) {
            int q1 = (int)((ql[i] & 0x0F) | (((qh[i] >> 0) & 3) << 4)) - 32;
            int q2 = (int)((ql[i + 32] & 0x0F) | (((qh[i] >> 2) & 3) << 4)) - 32;
            int q3 = (int)((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32;
            int q4 = (int)((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32;
            wh[i] = (d * (float)sc[i / 16]) * (float)q1;
            wh[i + 32] = (d * (float)sc[2 + i / 16]) * (float)q2;
            wh[i + 64] = (d * (float)sc[4 + i / 16]) * (float)q3;
            wh[i + 96] = (d * (float)sc[6 + i / 16]) * (float)q4;
        }
    }
}

#if defined(__AVX512F__)
#include "quants_avx512.h"
#else
/* Dot products of a quantized row with x, one per format: the same weights as unpack_*, multiply-added in 32 fp32
   lanes, which the compiler vectorises for the CPU it targets (quants_avx512.h has them in AVX-512). */
static inline float mt_sum_lanes(const float *lanes) {
    float sum = 0.f;
    for (int l = 0; l < 32; l++) sum += lanes[l];
    return sum;
}

static inline float dot_q8_0(const uint8_t *row, const float *x, int64_t n) {
    float lanes[32] = {0};
    for (int64_t start = 0; start < n; start += 32, row += 34) {
        float d = mt_load_half(row);
        const int8_t *q = (const int8_t *)(row + 2);
        #pragma omp simd
        for (int i = 0; i < 32; i++) lanes[i] += ((float)q[i] * d) * x[start + i];
    }
    return mt_sum_lanes(lanes);
}

static inline float dot_q4_0(const uint8_t *row, const float *x, int64_t n) {
    float lanes[32] = {0};
    for (int64_t start = 0; start < n; start += 32, row += 18) {
        float d = mt_load_half(row);
        const uint8_t *q = row + 2;
        #pragma omp simd
        for (int i = 0; i < 16; i++) {
            lanes[i] += (d * (float)((int)(q[i] & 0x0F) - 8)) * x[start + i];
            lanes[i + 16] += (d * (float)((int)(q[i] >> 4) - 8)) * x[start + i + 16];
        }
    }
    return mt_sum_lanes(lanes);
}

static inline float dot_q4_1(const uint8_t *row, const float *x, int64_t n) {
    float lanes[32] = {0};
    for (int64_t start = 0; start < n; start += 32, row += 20) {
        float d = mt_load_half(row), m = mt_load_half(row + 2);
        const uint8_t *q = row + 4;
        #pragma omp simd
        for (int i = 0; i < 16; i++) {
            lanes[i] += (d * (float)(q[i] & 0x0F) + m) * x[start + i];
            lanes[i + 16] += (d * (float)(q[i] >> 4) + m) * x[start + i + 16];
        }
    }
    return mt_sum_lanes(lanes);
}

static inline float dot_q4_k(const uint8_t *row, const float *x, int64_t n) {
    float lanes[32] = {0};
    for (int64_t start = 0; start < n; start += 256, row += 144) {
        float d = mt_load_half(row), dmin = mt_load_half(row + 2);
        for (int chunk = 0; chunk < 4; chunk++) {
            int sc0, m0, sc1, m1;
            q4_k_scale_min(row + 4, 2 * chunk, &sc0, &m0);
            q4_k_scale_min(row + 4, 2 * chunk + 1, &sc1, &m1);
            float d0 = d * (float)sc0, min0 = dmin * (float)m0, d1 = d * (float)sc1, min1 = dmin * (float)m1;
            const uint8_t *q = row + 16 + 32 * chunk;
            const float *xc = x + start + 64 * chunk;
            #pragma omp simd
            for (int i = 0; i < 32; i++) lanes[i] += (d0 * (float)(q[i] & 0x0F) - min0) * xc[i];
            #pragma omp simd
            for (int i = 0; i < 32; i++) lanes[i] += (d1 * (float)(q[i] >> 4) - min1) * xc[i + 32];
        }
    }
    return mt_sum_lanes(lanes);
}

static inline float dot_q6_k(const uint8_t *row, const float *x, int64_t n) {
    float lanes[32] = {0};
    for (int64_t start = 0; start < n; start += 256, row += 210) {
        float d = mt_load_half(row + 208);
        const int8_t *scales = (const int8_t *)(row + 192);
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = row + 64 * half, *qh = row + 128 + 32 * half;
            const int8_t *sc = scales + 8 * half;
            const float *xh = x + start + 128 * half;
            for (int part = 0; part < 2; part++) {                     /* i in [16 part, 16 part + 16): one scale */
                float s1 = d * (float)sc[part], s2 = d * (float)sc[2 + part];
                float s3 = d * (float)sc[4 + part], s4 = d * (float)sc[6 + part];
                #pragma omp simd
                for (int j = 0; j < 16; j++) {
                    int i = 16 * part + j;
                    int q1 = (int)((ql[i] & 0x0F) | (((qh[i] >> 0) & 3) << 4)) - 32;
                    int q2 = (int)((ql[i + 32] & 0x0F) | (((qh[i] >> 2) & 3) << 4)) - 32;
                    int q3 = (int)((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32;
                    int q4 = (int)((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32;
                    lanes[i] += (s1 * (float)q1) * xh[i] + (s2 * (float)q2) * xh[i + 32];
                    lanes[i] += (s3 * (float)q3) * xh[i + 64] + (s4 * (float)q4) * xh[i + 96];
                }
            }
        }
    }
    return mt_sum_lanes(lanes);
}

#endif  /* __AVX512F__ */

#endif
