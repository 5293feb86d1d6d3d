/* decode.c: one decoding step of a Mistral / Llama model (one new token per row), in plain C, after llama2.c's run.c.

The same maths as the PyTorch modules (block.py, attention.py, feedforward.py, embedding.py), for T = 1, in one call:
no Python, no allocation and no thread start per operation. fused_decode.py builds the structs below from a model's
own tensors (nothing is copied: the weights are read where the model holds them) and calls mt_decode_step.

    h   = x + Wo Attention(RoPE(Wq n), RoPE(Wk n), Wv n),  n = RMSNorm(x)        (block.py)
    out = h + W2 (SiLU(W1 m) * W3 m),                   m = RMSNorm(h)        (feedforward.py)

Left out: MoE layers and a sliding window cut inside the cache (the cache never holds more than W keys, cache.py),
which stay with the PyTorch path.
*/
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "rowdot.h"

typedef struct {
    const float *attention_norm, *ffn_norm;   /* (dim,) fp32 */
    mt_matrix wq, wk, wv, wo, w1, w2, w3;
} mt_layer;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size;
    float norm_eps;
    int32_t unused;
    const float *norm;                        /* (dim,) fp32 */
    mt_matrix output;                         /* (vocab, dim) */
    const mt_layer *layers;
} mt_model;

typedef struct {
    float *keys, *values;        /* (L, B, Hkv, S, D) fp32 */
    int64_t batch, size;         /* B, S */
    int64_t slot;                /* the slot this step's key and value go to */
    int64_t n_keys;              /* slots [0, n_keys) are attended */
    const int64_t *slot_time;    /* (S,) the time each slot holds, after this step's write */
    const int64_t *pad;          /* (B,) padding tokens in front of each row, or NULL */
    int64_t time;                /* this step's time index */
    const float *cos, *sin;      /* (B or 1, D) RoPE angles of this step's positions */
    int64_t rope_rows;           /* 1 or B */
} mt_step;

typedef struct {                 /* work buffers, fp32 */
    float *normed;               /* (B, dim) */
    float *q, *k, *v;            /* (B, H*D), (B, Hkv*D), (B, Hkv*D) */
    float *attended;             /* (B, H*D) */
    float *hidden;               /* (B, hidden_dim) */
    float *scores;               /* (B*H, S) */
} mt_scratch;

/* y[b, r] (+)= W[r] . x[b] for rows [0, W->rows); in a parallel region, shares the rows among the threads. With
   more than one input row, a quantized row is unpacked once and its fp32 weights reused for every input. */
static void product(const mt_matrix *w, const float *x, float *y, int64_t batch, int add, int wait) {
    float unpacked[batch > 1 && w->format >= MT_Q8_0 ? w->cols : 1];
    #pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < w->rows; r++) {
        const float *weights = 0;
        if (batch > 1 && w->format >= MT_Q8_0) {
            mt_unpack_row(w, r, unpacked);
            weights = unpacked;
        }
        for (int64_t b = 0; b < batch; b++) {
            float dot = weights ? dot_f32(weights, x + b * w->cols, w->cols) : mt_row_dot(w, r, x + b * w->cols);
            y[b * w->rows + r] = add ? y[b * w->rows + r] + dot : dot;
        }
    }
    if (wait) {
        #pragma omp barrier
    }
}

static void matvec(const mt_matrix *w, const float *x, float *y, int64_t batch, int wait) {
    product(w, x, y, batch, 0, wait);
}

/* x[b, r] += W[r] . h[b]: a projection added into the residual stream */
static void matvec_add(const mt_matrix *w, const float *h, float *x, int64_t batch) {
    product(w, h, x, batch, 1, 1);
}

/* Zhang & Sennrich 2019, eq. (4): y = x / sqrt(mean(x^2) + eps) * g, for each of the B rows */
static void rms_norm(const float *x, const float *g, float *y, int64_t batch, int64_t dim, float eps) {
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        const float *xb = x + b * dim;
        float sum = 0.f;
        for (int64_t i = 0; i < dim; i++) sum += xb[i] * xb[i];
        float inv_rms = 1.f / sqrtf(sum / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) y[b * dim + i] = g[i] * (xb[i] * inv_rms);
    }
}

/* RoFormer eq. (34), rotate-half form: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on each head's two halves */
static void rope(float *x, int64_t batch, int64_t heads, int64_t head_dim, const mt_step *s) {
    int64_t half = head_dim / 2;
    for (int64_t b = 0; b < batch; b++) {
        const float *cos = s->cos + (s->rope_rows > 1 ? b : 0) * head_dim;
        const float *sin = s->sin + (s->rope_rows > 1 ? b : 0) * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (b * heads + h) * head_dim;
            for (int64_t i = 0; i < half; i++) {
                float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * cos[i] + (-x2) * sin[i];
                v[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
            }
        }
    }
}

/* softmax(q k^T / sqrt(D)) v over the cached keys of one layer, each query head reading its kv head (GQA) */
static void attend(const mt_model *m, const mt_step *s, const mt_scratch *w, int64_t layer) {
    int64_t B = s->batch, H = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim, S = s->size;
    int64_t n_rep = H / Hkv;
    float scale = 1.f / sqrtf((float)D);
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, g = h / n_rep;
        const float *q = w->q + bh * D;
        const float *keys = s->keys + (((layer * B + b) * Hkv + g) * S) * D;
        const float *values = s->values + (((layer * B + b) * Hkv + g) * S) * D;
        float *score = w->scores + bh * S, top = -INFINITY;
        for (int64_t j = 0; j < s->n_keys; j++) {
            int64_t t = s->slot_time[j];
            /* padding in front of row b is invisible; a token always sees itself */
            int visible = t >= 0 && (s->pad == 0 || t >= s->pad[b] || t == s->time);
            score[j] = visible ? dot_f32(q, keys + j * D, D) * scale : -INFINITY;
            if (score[j] > top) top = score[j];
        }
        float total = 0.f;
        for (int64_t j = 0; j < s->n_keys; j++) {
            score[j] = score[j] == -INFINITY ? 0.f : expf(score[j] - top);
            total += score[j];
        }
        float *out = w->attended + bh * D;
        for (int64_t i = 0; i < D; i++) out[i] = 0.f;
        for (int64_t j = 0; j < s->n_keys; j++) {
            float p = score[j] / total;
            const float *v = values + j * D;
            for (int64_t i = 0; i < D; i++) out[i] += p * v[i];
        }
    }
}

/* Shazeer 2020, eq. (6): (SiLU(x W1) * x W3), row by row so each hidden unit reads its two weight rows once */
static void swiglu(const mt_layer *l, const float *x, float *hidden, int64_t batch) {
    int64_t I = l->w1.rows;
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < I; r++)
        for (int64_t b = 0; b < batch; b++) {
            float gate = mt_row_dot(&l->w1, r, x + b * l->w1.cols);
            float up = mt_row_dot(&l->w3, r, x + b * l->w3.cols);
            hidden[b * I + r] = gate / (1.f + expf(-gate)) * up;
        }
}

/* The new keys and values, rotated, into this step's slot of the rolling buffer (cache.py) */
static void write_cache(const mt_model *m, const mt_step *s, const mt_scratch *w, int64_t layer) {
    int64_t B = s->batch, Hkv = m->n_kv_heads, D = m->head_dim, S = s->size;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < Hkv; g++) {
            int64_t at = ((((layer * B + b) * Hkv + g) * S) + s->slot) * D;
            for (int64_t i = 0; i < D; i++) {
                s->keys[at + i] = w->k[(b * Hkv + g) * D + i];
                s->values[at + i] = w->v[(b * Hkv + g) * D + i];
            }
        }
}

/* x (B, dim): the embedded tokens in, the residual stream after the last layer out; logits (B, vocab) */
void mt_decode_step(const mt_model *m, const mt_step *s, const mt_scratch *w, float *x, float *logits,
                    int n_threads) {
    int64_t B = s->batch;
    #pragma omp parallel num_threads(n_threads)
    {
        for (int64_t layer = 0; layer < m->n_layers; layer++) {
            const mt_layer *l = &m->layers[layer];
            rms_norm(x, l->attention_norm, w->normed, B, m->dim, m->norm_eps);
            matvec(&l->wq, w->normed, w->q, B, 0);            /* q, k and v share the threads: one wait */
            matvec(&l->wk, w->normed, w->k, B, 0);
            matvec(&l->wv, w->normed, w->v, B, 1);
            #pragma omp single
            {
                rope(w->q, B, m->n_heads, m->head_dim, s);
                rope(w->k, B, m->n_kv_heads, m->head_dim, s);
                write_cache(m, s, w, layer);
            }
            attend(m, s, w, layer);
            matvec_add(&l->wo, w->attended, x, B);
            rms_norm(x, l->ffn_norm, w->normed, B, m->dim, m->norm_eps);
            swiglu(l, w->normed, w->hidden, B);
            matvec_add(&l->w2, w->hidden, x, B);
        }
        rms_norm(x, m->norm, w->normed, B, m->dim, m->norm_eps);
        matvec(&m->output, w->normed, logits, B, 1);
    }
}

/* y (B, rows) = x (B, cols) W^T, for the PyTorch path's short products (weight_only.py, quantized.py) */
void mt_matvec(const mt_matrix *w, const float *x, float *y, int64_t batch, int n_threads) {
    #pragma omp parallel num_threads(n_threads)
    matvec(w, x, y, batch, 1);
}

/* out (n, cols) fp32 = rows `which[0..n)` of W (every row in order if which is NULL): unpacked, exactly */
void mt_unpack_rows(const mt_matrix *w, const int64_t *which, int64_t n, float *out, int n_threads) {
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < n; i++) mt_unpack_row(w, which ? which[i] : i, out + i * w->cols);
}
