/* Elementwise ops and row copies.  Each work-item of the flat kernels
 * handles VW consecutive elements, whole vectors where they fit. */

#define GELU_C 0.7978845608028654f  /* sqrt(2 / pi) */

inline vecf gelu_v(vecf x) { return 0.5f * x * (1.0f + tanh(GELU_C * (x + 0.044715f * x * x * x))); }
inline float gelu_s(float x) { return 0.5f * x * (1.0f + tanh(GELU_C * (x + 0.044715f * x * x * x))); }

/* out[i] = a[i] + b[i], n elements */
__kernel __attribute__((reqd_work_group_size(EW_L, 1, 1)))
void add(__global const float *a, __global const float *b, __global float *out, const int n)
{
    const int i = get_global_id(0) * VW;
    if (i + VW <= n) {
        STOREG(LOADG(a + i) + LOADG(b + i), out + i);
    } else {
        for (int j = i; j < n; ++j) out[j] = a[j] + b[j];
    }
}

/* out[i] = a[i] + b[i % nb]: b broadcast over the leading axes of a */
__kernel __attribute__((reqd_work_group_size(EW_L, 1, 1)))
void add_bcast(__global const float *a, __global const float *b, __global float *out,
               const int n, const int nb)
{
    const int i = get_global_id(0);
    if (i < n) out[i] = a[i] + b[i % nb];
}

/* GPT-2's tanh approximation; tanh saturates, so large |x| gives x or 0 */
__kernel __attribute__((reqd_work_group_size(EW_L, 1, 1)))
void gelu(__global const float *x, __global float *out, const int n)
{
    const int i = get_global_id(0) * VW;
    if (i + VW <= n) {
        STOREG(gelu_v(LOADG(x + i)), out + i);
    } else {
        for (int j = i; j < n; ++j) out[j] = gelu_s(x[j]);
    }
}

/* out[r, :] = table[ids[r], :], global (n, n_ids) */
__kernel __attribute__((reqd_work_group_size(EW_L, 1, 1)))
void embedding(__global const float *table, __global const int *ids, __global float *out,
               const int n)
{
    const int c = get_global_id(0), r = get_global_id(1);
    if (c < n) out[(size_t)r * n + c] = table[(size_t)ids[r] * n + c];
}

/* The KV-cache write: rows row0 + i of qkv's k and v thirds go to position
 * start + i of the head-major caches [n_head, capacity, d].
 * Global (n_embd, n_new). */
__kernel __attribute__((reqd_work_group_size(EW_L, 1, 1)))
void kv_write(__global const float *qkv, __global float *k, __global float *v,
              const int n_embd, const int d, const int capacity, const int start, const int row0)
{
    const int c = get_global_id(0), i = get_global_id(1);
    if (c >= n_embd) return;
    const __global float *row = qkv + (size_t)(row0 + i) * 3 * n_embd;
    const size_t at = ((size_t)(c / d) * capacity + start + i) * d + c % d;
    k[at] = row[n_embd + c];
    v[at] = row[2 * n_embd + c];
}
