/* Products of few rows (decode: m <= GEMV_MAX_M) with weights in any storage
 * format (f32, f16, bf16, int8), widened to float32 as they are read, with
 * float32 accumulation.  More rows go to cuBLAS, reduced formats after `widen`
 * makes a float32 copy; decode never needs cuBLAS, so it can be captured in a
 * CUDA graph (CuPy refuses cuBLAS calls while a stream is captured).
 *
 * gemv_n: y [m, n] = x [m, k] @ w [k, n] * scale[n] + bias[n]   (GPT-2 Conv1D)
 *   and, where `act` is not null, act = gelu(y) too (the MLP's GELU, fused);
 *   and, where `kv_rows` is not null, y is a qkv [m, 3 kv_e] whose k and v
 *   columns also go into each row's caches (attention.cu's kv_write, fused);
 *   and, where `ln` is not null, x is first made from ln: sum = a + b, x =
 *   layernorm(sum) (the residual add and layernorm before the product), in
 *   dynamic shared memory (m * k floats) by every block; block 0 also writes
 *   sum and x out, so both still hold what their ops promise;
 *   block (32, GEMV_WARPS): a warp's lanes take 32 neighbouring columns, so
 *   each row of w is read coalesced; the warps split k and add up in shared memory.
 * gemv_t: y [m, n] = x [m, k] @ w[n, k]^T * scale[n]             (tied lm_head)
 *   one warp per output column: lanes stride along that row of w.
 * Each weight is read once for all m rows (m <= GEMV_MAX_M: small decode batches). */

#ifndef GEMV_WARPS
#error "GEMV_WARPS must be defined"
#endif
#ifndef GEMV_MAX_M
#error "GEMV_MAX_M must be defined"
#endif

struct LayerNormIn {  /* the prologue's operands: sum = a + b, x = g * norm(sum) + beta */
    const float *a, *b, *g, *beta;
    float *sum, *x;
    float eps;
};

/* rows 0..m-1 of xs [m, k] = layernorm(a + b), as norm.cu's add_layernorm computes them */
__device__ void layernorm_rows(const LayerNormIn &ln, float *xs, int m, int k)
{
    __shared__ float red[32];
    const int t = linear_tid(), n_threads = blockDim.x * blockDim.y;
    const bool writer = blockIdx.x == 0;
    for (int r = 0; r < m; ++r) {
        const float *ar = ln.a + (long long)r * k, *br = ln.b + (long long)r * k;
        float *xr = xs + (long long)r * k;
        float s = 0.0f;
        for (int c = t; c < k; c += n_threads) { const float v = ar[c] + br[c]; xr[c] = v; s += v; }
        const float mean = block_sum(s, red) / k;
        float q = 0.0f;
        for (int c = t; c < k; c += n_threads) { const float v = xr[c] - mean; q += v * v; }
        const float inv = rsqrtf(block_sum(q, red) / k + ln.eps);
        for (int c = t; c < k; c += n_threads) {
            const float v = xr[c], o = ln.g[c] * ((v - mean) * inv) + ln.beta[c];
            xr[c] = o;
            if (writer) { ln.sum[(long long)r * k + c] = v; ln.x[(long long)r * k + c] = o; }
        }
    }
    __syncthreads();  /* xs complete before any warp reads it */
}

template <typename W>
__device__ void gemv_n(const float *x, const W *w, const float *scale, const float *bias, float *y,
                       float *act, const long long *kv_seqs, const long long *kv_rows, int kv_e, int kv_d,
                       const LayerNormIn *ln, int m, int k, int n)
{
    __shared__ float red[GEMV_MAX_M][GEMV_WARPS][32];
    extern __shared__ float xs[];
    if (ln) {
        layernorm_rows(*ln, xs, m, k);
        x = xs;
    }
    const int j = blockIdx.x * 32 + threadIdx.x;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) acc[r] = 0.0f;
    if (j < n) {
        for (int i = threadIdx.y; i < k; i += GEMV_WARPS) {
            const float wij = wload(w, (long long)i * n + j);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_M; ++r)
                if (r < m) acc[r] += x[(long long)r * k + i] * wij;
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) red[r][threadIdx.y][threadIdx.x] = acc[r];
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        const float s = scale ? scale[j] : 1.0f, b = bias ? bias[j] : 0.0f;
        for (int r = 0; r < m; ++r) {
            float t = 0.0f;
            for (int g = 0; g < GEMV_WARPS; ++g) t += red[r][g][threadIdx.x];
            const float v = t * s + b;
            y[(long long)r * n + j] = v;
            if (act) act[(long long)r * n + j] = gelu_f(v);
            if (kv_rows && j >= kv_e) {  /* row r of qkv is new row r of the batch */
                const long long *row = kv_rows + (long long)r * ROW_FIELDS;
                const long long *seq = kv_seqs + row[0] * SEQ_FIELDS;
                const int is_v = j >= 2 * kv_e, c = j - (is_v ? 2 : 1) * kv_e;
                float *cache = (float *)seq[is_v];
                cache[((long long)(c / kv_d) * seq[2] + row[1]) * kv_d + c % kv_d] = v;
            }
        }
    }
}

template <typename W>
__device__ void gemv_t(const float *x, const W *w, const float *scale, float *y, int m, int k, int n)
{
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;  /* whole warps leave together */
    const W *wj = w + (long long)j * k;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) acc[r] = 0.0f;
    for (int i = lane; i < k; i += 32) {
        const float wji = wload(wj, i);
#pragma unroll
        for (int r = 0; r < GEMV_MAX_M; ++r)
            if (r < m) acc[r] += x[(long long)r * k + i] * wji;
    }
    const float s = scale ? scale[j] : 1.0f;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
        const float t = warp_sum(acc[r]);
        if (r < m && lane == 0) y[(long long)r * n + j] = t * s;
    }
}

/* out [rows, cols] = w * scale, the scale running along `axis` (1: per column, 0: per row) */
template <typename W>
__device__ void widen(const W *w, const float *scale, float *out, long long rows, long long cols, int axis)
{
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = wload(w, i) * (scale ? scale[axis ? i % cols : i / cols] : 1.0f);
}

#define GEMV_KERNELS(NAME, W)                                                                        \
    extern "C" __global__ void gemv_n_##NAME(const float *x, const W *w, const float *scale,       \
                                             const float *bias, float *y, float *act,              \
                                             const long long *kv_seqs, const long long *kv_rows,   \
                                             int kv_e, int kv_d, const float *ln_a,                \
                                             const float *ln_b, const float *ln_g,                 \
                                             const float *ln_beta, float *ln_sum, float *ln_x,     \
                                             float ln_eps, int m, int k, int n)                    \
    {                                                                                              \
        const LayerNormIn ln{ln_a, ln_b, ln_g, ln_beta, ln_sum, ln_x, ln_eps};                     \
        gemv_n(x, w, scale, bias, y, act, kv_seqs, kv_rows, kv_e, kv_d, ln_a ? &ln : nullptr, m, k, n); \
    }                                                                                              \
    extern "C" __global__ void gemv_t_##NAME(const float *x, const W *w, const float *scale,       \
                                             float *y, int m, int k, int n)                        \
    { gemv_t(x, w, scale, y, m, k, n); }

#define FORMAT_KERNELS(NAME, W)                                                                      \
    GEMV_KERNELS(NAME, W)                                                                          \
    extern "C" __global__ void widen_##NAME(const W *w, const float *scale, float *out,            \
                                            long long rows, long long cols, int axis)              \
    { widen(w, scale, out, rows, cols, axis); }

GEMV_KERNELS(f32, float)  /* float32 weights need no widening copy: no widen_f32 */
FORMAT_KERNELS(f16, f16_t)
FORMAT_KERNELS(bf16, unsigned short)
FORMAT_KERNELS(int8, signed char)
