/* Causal multi-head attention of one sequence over its KV cache, read in
 * place.  One work-group (ATT_L work-items) per (query i, head h): scores
 * for the visible keys go to a global scratch row, are turned into
 * probabilities there, and weight the rows of v.
 *
 *   qkv     [*, 3 * n_embd]        fused c_attn output; this sequence's rows start at row0
 *   k, v    [n_head, capacity, d]  the cache, already holding this call's rows
 *   scores  [n_head, n_new, n_kv]  scratch
 *   out     [*, n_embd]            rows row0 .. row0 + n_new are written
 *
 * Query i is position n_kv - n_new + i and sees keys 0 .. that position. */
#if ATT_L < VW
#error "ATT_L must be at least VW"
#endif
__kernel __attribute__((reqd_work_group_size(ATT_L, 1, 1)))
void attention(__global const float *qkv, __global const float *k, __global const float *v,
               __global float *scores, __global float *out, const int n_new, const int n_kv,
               const int n_embd, const int d, const int capacity, const int row0, const float scale)
{
    __local float red[ATT_L];
    __local float part[ATT_L * VW];
    const int lid = get_local_id(0), i = get_group_id(0), h = get_group_id(1);
    const int n_vis = n_kv - n_new + i + 1;
    const __global float *q = qkv + (size_t)(row0 + i) * 3 * n_embd + h * d;
    const __global float *kh = k + (size_t)h * capacity * d;
    const __global float *vh = v + (size_t)h * capacity * d;
    __global float *s = scores + ((size_t)h * n_new + i) * n_kv;
    __global float *o = out + (size_t)(row0 + i) * n_embd + h * d;
    const int dv = (d / VW) * VW;

    float m = -INFINITY;
    for (int j = lid; j < n_vis; j += ATT_L) {
        const __global float *kj = kh + (size_t)j * d;
        vecf acc = 0.0f;
        for (int c = 0; c < dv; c += VW) acc += LOADG(q + c) * LOADG(kj + c);
        float dot = hsum(acc);
        for (int c = dv; c < d; ++c) dot += q[c] * kj[c];
        dot *= scale;
        s[j] = dot;
        m = dot > m ? dot : m;
    }
    m = group_max(red, m);
    float sum = 0.0f;
    for (int j = lid; j < n_vis; j += ATT_L) {
        const float e = exp(s[j] - m);
        s[j] = e;
        sum += e;
    }
    const float inv = 1.0f / group_sum(red, sum);
    barrier(CLK_GLOBAL_MEM_FENCE);  /* every work-item reads all of s below */

    /* out = p @ v: the work-items split the keys, each summing VW channels
     * of its rows at a time (contiguous loads), then add up through local memory */
    for (int c0 = 0; c0 < dv; c0 += VW) {
        vecf acc = 0.0f;
        for (int j = lid; j < n_vis; j += ATT_L) acc += s[j] * LOADG(vh + (size_t)j * d + c0);
        STOREL(acc, part + lid * VW);
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < VW) {
            float t = 0.0f;
            for (int l = 0; l < ATT_L; ++l) t += part[l * VW + lid];
            o[c0 + lid] = t * inv;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int c = dv + lid; c < d; c += ATT_L) {  /* channels past the last whole vector */
        float acc = 0.0f;
        for (int j = 0; j < n_vis; ++j) acc += s[j] * vh[(size_t)j * d + c];
        o[c] = acc * inv;
    }
}
