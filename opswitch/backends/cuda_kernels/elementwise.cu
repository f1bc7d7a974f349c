/* Row-independent ops: residual add, GELU, row gathers (embedding, take_rows).
 * One thread per element; sizes are arguments, so one build serves every shape. */

extern "C" __global__ void add(const float *a, const float *b, float *out, long long n)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

/* a [n / n_b, n_b] + b [n_b]: a trailing-shape operand broadcast over the rows */
extern "C" __global__ void add_bcast(const float *a, const float *b, float *out, long long n, long long n_b)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i % n_b];
}

extern "C" __global__ void gelu(const float *x, float *out, long long n)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = gelu_f(x[i]);
}

/* out[r, :] = table[ids[r], :] * scale[ids[r]]  (scale: int8 tables' per-row scales, or null).
 * grid (n_rows, ceil(n / blockDim.x)); ids are already checked and non-negative. */
template <typename W>
__device__ void gather_rows(const W *table, const float *scale, const long long *ids, float *out, int n)
{
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    const long long r = blockIdx.x, id = ids[r];
    if (c < n) out[r * n + c] = wload(table, id * n + c) * (scale ? scale[id] : 1.0f);
}

extern "C" __global__ void gather_f32(const float *t, const float *s, const long long *ids, float *out, int n)
{ gather_rows(t, s, ids, out, n); }
extern "C" __global__ void gather_f16(const f16_t *t, const float *s, const long long *ids, float *out, int n)
{ gather_rows(t, s, ids, out, n); }
extern "C" __global__ void gather_bf16(const unsigned short *t, const float *s, const long long *ids, float *out, int n)
{ gather_rows(t, s, ids, out, n); }
extern "C" __global__ void gather_int8(const signed char *t, const float *s, const long long *ids, float *out, int n)
{ gather_rows(t, s, ids, out, n); }

/* out[r, :] = bias  (rows of the GEMM output, before cuBLAS adds x @ w with beta = 1) */
extern "C" __global__ void fill_rows(const float *bias, float *out, long long n, int n_b)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = bias[i % n_b];
}
