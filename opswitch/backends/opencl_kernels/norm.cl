/* Row-wise ops: one work-group (NORM_L work-items) per row. */

/* out = g * (x - mean) / sqrt(var + eps) + b over rows of length n.  Two
 * passes (mean, then the centred variance) so inputs of magnitude 1e4 do
 * not cancel catastrophically. */
__kernel __attribute__((reqd_work_group_size(NORM_L, 1, 1)))
void layernorm(__global const float *x, __global const float *g, __global const float *b,
               __global float *out, const int n, const float eps)
{
    __local float red[NORM_L];
    const int lid = get_local_id(0);
    const __global float *row = x + (size_t)get_group_id(0) * n;
    __global float *dst = out + (size_t)get_group_id(0) * n;

    float s = 0.0f;
    for (int j = lid; j < n; j += NORM_L) s += row[j];
    const float mean = group_sum(red, s) / n;
    s = 0.0f;
    for (int j = lid; j < n; j += NORM_L) {
        const float d = row[j] - mean;
        s += d * d;
    }
    const float inv = rsqrt(group_sum(red, s) / n + eps);
    for (int j = lid; j < n; j += NORM_L) dst[j] = g[j] * ((row[j] - mean) * inv) + b[j];
}

/* Softmax over rows of length n_k.  With causal, row r is query
 * i = r % n_q of the last n_q positions and sees keys 0 .. n_k - n_q + i;
 * hidden keys get 0.  A row with nothing visible (or all -inf) gives zeros,
 * not NaN. */
__kernel __attribute__((reqd_work_group_size(NORM_L, 1, 1)))
void softmax(__global const float *x, __global float *out, const int n_k, const int n_q,
             const int causal)
{
    __local float red[NORM_L];
    const int lid = get_local_id(0), r = get_group_id(0);
    const __global float *row = x + (size_t)r * n_k;
    __global float *dst = out + (size_t)r * n_k;
    const int n_vis = causal ? clamp(n_k - n_q + r % n_q + 1, 0, n_k) : n_k;

    float m = -INFINITY;
    for (int j = lid; j < n_vis; j += NORM_L) m = fmax(m, row[j]);
    m = group_max(red, m);
    const bool none = m == -INFINITY;  /* no early return: PoCL needs every work-item at each barrier */
    float s = 0.0f;
    for (int j = lid; j < n_k; j += NORM_L) {
        const float e = (j < n_vis && !none) ? exp(row[j] - m) : 0.0f;
        dst[j] = e;
        s += e;
    }
    s = group_sum(red, s);
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int j = lid; j < n_k; j += NORM_L) dst[j] *= inv;
}
