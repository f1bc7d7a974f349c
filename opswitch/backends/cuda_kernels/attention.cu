/* Attention over the caller's head-major KV cache ([n_head, capacity, d] per
 * sequence), for a ragged batch in one launch.  Host integers arrive through
 * device memory (the backend's slot arena), so a captured CUDA graph replays
 * unchanged while positions move on:
 *
 *   seqs [n_seq][4]  = k cache address, v cache address, capacity, unused
 *   rows [n_rows][3] = sequence, position, row of qkv / out
 *
 * kv_write copies every new row's k and v into its cache; the split kernels
 * then attend one query row each ("flash-decoding"): the keys 0 .. position
 * are cut into ATT_CHUNK-long splits, each block reduces one split to a
 * running max, a sum and a weighted sum of v, and attn_combine merges them.
 * The grid covers the capacity, not the length, so it does not change as a
 * sequence grows; blocks past the length write an empty split. */

#ifndef ATT_CHUNK
#error "ATT_CHUNK must be defined"
#endif
#ifndef ATT_THREADS
#error "ATT_THREADS must be defined"
#endif

/* grid (n_rows, ceil(n_embd / blockDim.x)) */
extern "C" __global__ void kv_write(const float *qkv, const long long *seqs, const long long *rows,
                                    int n_embd, int d)
{
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= n_embd) return;
    const long long *row = rows + (long long)blockIdx.x * ROW_FIELDS;
    const long long *seq = seqs + row[0] * SEQ_FIELDS;
    float *k = (float *)seq[0], *v = (float *)seq[1];
    const long long capacity = seq[2], pos = row[1];
    const float *src = qkv + row[2] * 3 * (long long)n_embd;
    const long long at = ((long long)(c / d) * capacity + pos) * d + c % d;
    k[at] = src[n_embd + c];
    v[at] = src[2 * n_embd + c];
}

/* grid (n_rows, n_head, n_splits), ATT_THREADS threads, dynamic shared memory
 * (d + ATT_CHUNK) floats.  part [n_rows, n_head, n_splits, d + 2]: the split's
 * weighted sum of v rows, then its max score and its sum of exponentials. */
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_split(const float *qkv, const long long *seqs, const long long *rows, float *part,
           int n_embd, int d, float scale)
{
    extern __shared__ float sh[];
    __shared__ float red[32];
    float *q = sh, *p = sh + d;
    const int split = blockIdx.z, h = blockIdx.y, n_splits = gridDim.z, n_head = gridDim.y;
    const long long r = blockIdx.x;
    const long long *row = rows + r * ROW_FIELDS;
    const long long *seq = seqs + row[0] * SEQ_FIELDS;
    const long long capacity = seq[2];
    const float *kh = (const float *)seq[0] + (long long)h * capacity * d;
    const float *vh = (const float *)seq[1] + (long long)h * capacity * d;
    const int j0 = split * ATT_CHUNK;
    const int j1 = min(j0 + ATT_CHUNK, (int)row[1] + 1);  /* keys 0 .. position */
    float *out = part + ((r * n_head + h) * n_splits + split) * (long long)(d + 2);

    if (j0 >= j1) {  /* past the sequence's length: an empty split */
        for (int c = threadIdx.x; c < d; c += ATT_THREADS) out[c] = 0.0f;
        if (threadIdx.x == 0) { out[d] = -INFINITY; out[d + 1] = 0.0f; }
        return;
    }
    const float *qr = qkv + row[2] * 3 * (long long)n_embd + h * d;
    for (int c = threadIdx.x; c < d; c += ATT_THREADS) q[c] = qr[c] * scale;
    __syncthreads();

    /* scores: a warp per key, lanes across the head's channels */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = ATT_THREADS / 32;
    for (int j = j0 + warp; j < j1; j += n_warps) {
        const float *kj = kh + (long long)j * d;
        float dot = 0.0f;
        for (int c = lane; c < d; c += 32) dot += q[c] * kj[c];
        dot = warp_sum(dot);
        if (lane == 0) p[j - j0] = dot;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < j1 - j0; j += ATT_THREADS) m = fmaxf(m, p[j]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int j = threadIdx.x; j < j1 - j0; j += ATT_THREADS) { const float e = expf(p[j] - m); p[j] = e; s += e; }
    s = block_sum(s, red);  /* its barriers also publish p */

    /* weighted sum of v: threads across channels, so each key's row is read coalesced */
    for (int c = threadIdx.x; c < d; c += ATT_THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < j1 - j0; ++j) acc += p[j] * vh[(long long)(j0 + j) * d + c];
        out[c] = acc;
    }
    if (threadIdx.x == 0) { out[d] = m; out[d + 1] = s; }
}

/* grid (n_rows, n_head): merge the splits of one (row, head) into out [*, n_embd]. */
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_combine(const float *part, const long long *rows, float *out, int n_embd, int d, int n_splits)
{
    const int h = blockIdx.y, n_head = gridDim.y;
    const long long r = blockIdx.x;
    const float *pr = part + (r * n_head + h) * n_splits * (long long)(d + 2);
    float m = -INFINITY;
    for (int s = 0; s < n_splits; ++s) m = fmaxf(m, pr[s * (long long)(d + 2) + d]);
    float total = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        const float *ps = pr + s * (long long)(d + 2);
        if (ps[d + 1] > 0.0f) total += ps[d + 1] * expf(ps[d] - m);
    }
    const float inv = 1.0f / total;  /* key 0 is always visible: total > 0 */
    float *o = out + rows[r * ROW_FIELDS + 2] * (long long)n_embd + h * d;
    for (int c = threadIdx.x; c < d; c += ATT_THREADS) {
        float acc = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            const float *ps = pr + s * (long long)(d + 2);
            if (ps[d + 1] > 0.0f) acc += ps[c] * expf(ps[d] - m);
        }
        o[c] = acc * inv;
    }
}
