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
