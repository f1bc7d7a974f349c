/* Row reductions: layernorm and softmax.  One block (NORM_THREADS) per row. */

#ifndef NORM_THREADS
#error "NORM_THREADS must be defined"
#endif

/* out = g * (x - mean) / sqrt(var + eps) + b over the last axis; two passes over
 * the row (it stays in L1/L2), so the variance is of centred values. */
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
layernorm(const float *x, const float *g, const float *b, float *out, int n, float eps)
{
    __shared__ float red[32];
    const float *xr = x + (long long)blockIdx.x * n;
    float *o = out + (long long)blockIdx.x * n;
    float s = 0.0f;
    for (int c = threadIdx.x; c < n; c += NORM_THREADS) s += xr[c];
    const float mean = block_sum(s, red) / n;
    float v = 0.0f;
    for (int c = threadIdx.x; c < n; c += NORM_THREADS) { const float t = xr[c] - mean; v += t * t; }
    const float inv = rsqrtf(block_sum(v, red) / n + eps);
    for (int c = threadIdx.x; c < n; c += NORM_THREADS) o[c] = g[c] * ((xr[c] - mean) * inv) + b[c];
}

/* sum = a + b, then out = layernorm(sum), in one pass per row: a residual add
 * and the layernorm after it (each thread reads back only what it wrote). */
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
add_layernorm(const float *a, const float *b, float *sum, const float *g, const float *beta, float *out,
              int n, float eps)
{
    __shared__ float red[32];
    const long long row = (long long)blockIdx.x * n;
    const float *ar = a + row, *br = b + row;
    float *sr = sum + row, *o = out + row;
    float s = 0.0f;
    for (int c = threadIdx.x; c < n; c += NORM_THREADS) { const float t = ar[c] + br[c]; sr[c] = t; s += t; }
    const float mean = block_sum(s, red) / n;
    float v = 0.0f;
    for (int c = threadIdx.x; c < n; c += NORM_THREADS) { const float t = sr[c] - mean; v += t * t; }
    const float inv = rsqrtf(block_sum(v, red) / n + eps);
    for (int c = threadIdx.x; c < n; c += NORM_THREADS) o[c] = g[c] * ((sr[c] - mean) * inv) + beta[c];
}

/* Softmax of scale * x over the last axis ([rows, n_k]).  With `causal`, row r
 * is query r % n_q of n_q and sees keys 0 .. n_k - n_q + r % n_q; hidden keys,
 * and rows with nothing visible (or all -inf), come out as 0.  In place is fine. */
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
softmax(const float *x, float *out, int n_k, int n_q, int causal, float scale)
{
    __shared__ float red[32];
    const long long row = blockIdx.x;
    const float *xr = x + row * n_k;
    float *o = out + row * n_k;
    int n_vis = causal ? n_k - n_q + (int)(row % n_q) + 1 : n_k;
    n_vis = n_vis < 0 ? 0 : (n_vis > n_k ? n_k : n_vis);
    float m = -INFINITY;
    for (int c = threadIdx.x; c < n_vis; c += NORM_THREADS) m = fmaxf(m, scale * xr[c]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int c = threadIdx.x; c < n_vis; c += NORM_THREADS) s += expf(scale * xr[c] - m);
    s = block_sum(s, red);
    const float inv = (m == -INFINITY || s == 0.0f) ? 0.0f : 1.0f / s;
    for (int c = threadIdx.x; c < n_k; c += NORM_THREADS)
        o[c] = c < n_vis && inv != 0.0f ? expf(scale * xr[c] - m) * inv : 0.0f;
}
