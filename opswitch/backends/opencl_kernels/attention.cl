/* Causal multi-head attention for one sequence, reading the KV cache in
 * place.  One work-group (ATT_L work-items) per (query i, head h):
 * scores for the visible keys go to a global scratch row, are turned into
 * probabilities there, and weight the rows of v.
 *
 *   qkv     [n_seq, 3 * n_embd]   the fused c_attn output (q is the first third)
 *   k, v    [n_kv, n_embd]        the cache, already holding this call's rows
 *   scores  [n_head, n_seq, n_kv] scratch
 *   out     [n_seq, n_embd]
 *
 * Query i is position n_kv - n_seq + i and sees keys 0 .. that position. */
#if ATT_L < VW
#error "ATT_L must be at least VW"
#endif
__kernel __attribute__((reqd_work_group_size(ATT_L, 1, 1)))
void attention(__global const float *qkv, __global const float *k, __global const float *v,
               __global float *scores, __global float *out, const int n_seq, const int n_kv,
               const int n_embd, const int d, const float scale)
{
    __local float red[ATT_L];
    __local float part[ATT_L * VW];
    const int lid = get_local_id(0), i = get_group_id(0), h = get_group_id(1);
    const int n_vis = n_kv - n_seq + i + 1;
    const __global float *q = qkv + (size_t)i * 3 * n_embd + h * d;
    __global float *s = scores + ((size_t)h * n_seq + i) * n_kv;
    const int dv = (d / VW) * VW;

    float m = -INFINITY;
    for (int j = lid; j < n_vis; j += ATT_L) {
        const __global float *kj = k + (size_t)j * n_embd + h * d;
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
        for (int j = lid; j < n_vis; j += ATT_L) acc += s[j] * LOADG(v + (size_t)j * n_embd + h * d + c0);
        STOREL(acc, part + lid * VW);
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < VW) {
            float t = 0.0f;
            for (int l = 0; l < ATT_L; ++l) t += part[l * VW + lid];
            out[(size_t)i * n_embd + h * d + c0 + lid] = t * inv;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int c = dv + lid; c < d; c += ATT_L) {  /* channels past the last whole vector */
        const __global float *vc = v + h * d + c;
        float acc = 0.0f;
        for (int j = 0; j < n_vis; ++j) acc += s[j] * vc[(size_t)j * n_embd];
        out[(size_t)i * n_embd + h * d + c] = acc * inv;
    }
}
