/* Block-quantized matrix products for x86 CPUs with AVX2 + FMA + F16C (engine/cpu_kernels.py
 * compiles this file once per machine and calls it through ctypes).
 *
 * Weights are ggml's blocks of 32 (llama.cpp's ggml-common.h): Q4_1 {fp16 d, fp16 m, 16 bytes of
 * codes, byte j holding element j in its low nibble and element j + 16 in its high one},
 * w = d * q + m; Q8_0 {fp16 d, 32 int8}, w = d * q. The activations are quantized per block of 32
 * to int16 (d = max |x| / 32767, q = round(x / d)) and a block's product is an integer dot
 * product (vpmaddwd), as ggml's AVX2 vec_dot does with int8 activations: about half the
 * instructions of PyTorch's float dequantize-and-multiply, so that a decode step streams its
 * weights at memory speed instead of waiting on arithmetic. int16, not ggml's int8: SmolLM2's
 * activations hold outliers a hundred times their median, and beside one an int8 block keeps
 * two digits of the rest (a 7% error in the logits, "Paris" lost); int16 keeps more than bf16.
 *
 * Every output element is computed by the same sequence of operations whatever the number of
 * rows in the call and wherever its row sits in it (no -ffast-math, explicit intrinsics, a
 * fixed reduction order), so that a token's logits do not depend on what it is batched with.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32
#define CODE_MAX 32767.0f /* activations' int16 codes: 127 (int8, ggml's) loses too much beside outliers */

typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [rows, k] fp32 -> int16 codes, their scale and (scale * sum of codes) per block. */
static void quantize_rows(const float *x, int64_t rows, int64_t k, int16_t *q, float *d, float *s) {
    const int64_t blocks = k / QK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < rows * blocks; b++) {
        const float *v = x + b * QK;
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < QK; j += 8)
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float largest = _mm_cvtss_f32(m4);
        const __m256 inverse = _mm256_set1_ps(largest != 0.0f ? CODE_MAX / largest : 0.0f);
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), inverse),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* to int16 in element order (packs interleaves the 128-bit lanes: permute them back) */
        for (int j = 0; j < 2; j++)
            _mm256_storeu_si256((__m256i *)(q + b * QK + 16 * j),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[2 * j], i32[2 * j + 1]), 0xD8));
        d[b] = largest / CODE_MAX;
        s[b] = d[b] * (float)_mm_cvtsi128_si32(s4);
    }
}

/* A block's 32 products summed in 8 int32 lanes, as floats: weights widened to int16 times the
 * activations' int16 codes (every partial sum is exact in an int32 and its float). */
static inline __m256 block_dot(__m256i w_low, __m256i w_high, const int16_t *x) {
    const __m256i low = _mm256_madd_epi16(w_low, _mm256_loadu_si256((const __m256i *)x));
    const __m256i high = _mm256_madd_epi16(w_high, _mm256_loadu_si256((const __m256i *)(x + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(low, high));
}

/* One weight row against R activation rows (R = 4 or 1: the same operations per row). */
#define Q4_ROW(R)                                                                                  \
    static void q4_row_##R(const block_q4_1 *w, int64_t blocks, const int16_t *q, const float *d,   \
                           const float *s, int64_t k, float *out, int64_t ldo) {                   \
        __m256 acc[R];                                                                             \
        float mins[R];                                                                             \
        for (int r = 0; r < R; r++) { acc[r] = _mm256_setzero_ps(); mins[r] = 0.0f; }              \
        for (int64_t b = 0; b < blocks; b++) {                                                     \
            const __m128i packed = _mm_loadu_si128((const __m128i *)w[b].qs);                      \
            const __m128i nibble = _mm_set1_epi8(0x0F);                                            \
            const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(packed, nibble));                \
            const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble)); \
            const float wd = half_to_float(w[b].d), wm = half_to_float(w[b].m);                    \
            for (int r = 0; r < R; r++) {                                                          \
                const int64_t at = r * (k / QK) + b;                                               \
                acc[r] = _mm256_fmadd_ps(block_dot(lo, hi, q + at * QK), _mm256_set1_ps(wd * d[at]), acc[r]); \
                mins[r] = fmaf(wm, s[at], mins[r]);                                                \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++) out[r * ldo] = hsum(acc[r]) + mins[r];                         \
    }
Q4_ROW(4)
Q4_ROW(1)

#define Q8_ROW(R)                                                                                  \
    static void q8_row_##R(const block_q8_0 *w, int64_t blocks, const int16_t *q, const float *d,   \
                           const float *s, int64_t k, float *out, int64_t ldo) {                   \
        (void)s;                                                                                   \
        __m256 acc[R];                                                                             \
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                  \
        for (int64_t b = 0; b < blocks; b++) {                                                     \
            const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[b].qs));    \
            const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[b].qs + 16))); \
            const float wd = half_to_float(w[b].d);                                                \
            for (int r = 0; r < R; r++) {                                                          \
                const int64_t at = r * (k / QK) + b;                                               \
                acc[r] = _mm256_fmadd_ps(block_dot(lo, hi, q + at * QK), _mm256_set1_ps(wd * d[at]), acc[r]); \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++) out[r * ldo] = hsum(acc[r]);                                   \
    }
Q8_ROW(4)
Q8_ROW(1)

typedef void (*row_fn)(const void *, int64_t, const int16_t *, const float *, const float *, int64_t, float *,
                       int64_t);

/* out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for x [rows, k] fp32, w [n, k / 32] blocks. */
static int matmul(const void *weights, size_t block_bytes, row_fn four, row_fn one, int64_t n, int64_t k,
                  const float *x, int64_t rows, const float *bias, float *out, int threads) {
    if (k % QK) return -1;
    const int64_t blocks = k / QK;
    int16_t *q = malloc(sizeof(int16_t) * (size_t)(rows * k));
    float *d = malloc(sizeof(float) * (size_t)(rows * blocks)), *s = malloc(sizeof(float) * (size_t)(rows * blocks));
    if (!q || !d || !s) { free(q); free(d); free(s); return -2; }
    quantize_rows(x, rows, k, q, d, s);
    const int64_t full = rows / 4 * 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const void *w = (const char *)weights + (size_t)i * (size_t)blocks * block_bytes;
        for (int64_t m = 0; m < full; m += 4)
            four(w, blocks, q + m * k, d + m * blocks, s + m * blocks, k, out + m * n + i, n);
        for (int64_t m = full; m < rows; m++)
            one(w, blocks, q + m * k, d + m * blocks, s + m * blocks, k, out + m * n + i, n);
        if (bias)
            for (int64_t m = 0; m < rows; m++) out[m * n + i] += bias[i];
    }
    free(q); free(d); free(s);
    return 0;
}

int hf_q4_1_matmul(const block_q4_1 *w, int64_t n, int64_t k, const float *x, int64_t rows, const float *bias,
                   float *out, int threads) {
    return matmul(w, sizeof(block_q4_1), (row_fn)q4_row_4, (row_fn)q4_row_1, n, k, x, rows, bias, out, threads);
}

int hf_q8_0_matmul(const block_q8_0 *w, int64_t n, int64_t k, const float *x, int64_t rows, const float *bias,
                   float *out, int threads) {
    return matmul(w, sizeof(block_q8_0), (row_fn)q8_row_4, (row_fn)q8_row_1, n, k, x, rows, bias, out, threads);
}

/* The block sizes, for the loader to check its structs against. */
int hf_block_bytes(int q8) { return q8 ? (int)sizeof(block_q8_0) : (int)sizeof(block_q4_1); }

/* HF's RMSNorm in fp32 over rows of length k: out = w * (x / sqrt(mean(x^2) + eps)), one call
 * for what PyTorch runs as six ops (about 60 us a call for 576 floats on a 2-core VM, most of it
 * dispatch). The mean is summed in a fixed order, eight lanes then across them. */
void hf_rms_norm(const float *x, const float *w, int64_t rows, int64_t k, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *v = x + r * k;
        __m256 squares = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) {
            const __m256 a = _mm256_loadu_ps(v + j);
            squares = _mm256_fmadd_ps(a, a, squares);
        }
        float sum = hsum(squares);
        for (; j < k; j++) sum = fmaf(v[j], v[j], sum);
        const float inverse = 1.0f / sqrtf(sum / (float)k + eps);
        const __m256 scale = _mm256_set1_ps(inverse);
        float *o = out + r * k;
        for (j = 0; j + 8 <= k; j += 8)
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_mul_ps(_mm256_loadu_ps(v + j), scale)));
        for (; j < k; j++) o[j] = w[j] * (v[j] * inverse);
    }
}
