/* Shared helpers, prepended to every .cu file (NVRTC needs no include path).
 *
 * Every kernel is extern "C" so CuPy's RawModule and the NVRTC compile
 * check find it by its plain name; templates are instantiated through
 * extern "C" wrappers, one per weight format.  No header is included:
 * float16 is widened with one PTX instruction, bfloat16 with a shift. */

#define FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

/* Sum (or max) over the block; every thread gets the result.  `red` is
 * shared scratch of 32 floats; the block's size is a multiple of 32 (warps are
 * cut from the linear thread index, so a 2D block (32, n) works too). */
__device__ __forceinline__ int linear_tid() { return threadIdx.x + threadIdx.y * blockDim.x; }

__device__ float block_sum(float v, float *red)
{
    const int t = linear_tid(), lane = t & 31, warp = t >> 5, n_warps = (blockDim.x * blockDim.y) >> 5;
    v = warp_sum(v);
    __syncthreads();  /* red may still be read by a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < n_warps ? red[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float *red)
{
    const int t = linear_tid(), lane = t & 31, warp = t >> 5, n_warps = (blockDim.x * blockDim.y) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < n_warps ? red[lane] : -INFINITY;
    return warp_max(v);
}

/* The slot arena's records of a ragged attention batch (attention.cu, and the
 * GEMV that writes the new keys and values straight into the caches):
 *   seqs [n_seq][4]  = k cache address, v cache address, capacity, unused
 *   rows [n_rows][3] = sequence, position, row of qkv / out */
#define SEQ_FIELDS 4
#define ROW_FIELDS 3

/* GPT-2's GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
__device__ __forceinline__ float gelu_f(float x)
{
    const float c = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

/* Weight storage formats (opswitch.core.formats), widened to float32 as read. */
__device__ __forceinline__ float wload(const float *w, long long i) { return w[i]; }

__device__ __forceinline__ float wload(const unsigned short *w, long long i)  /* bf16 bits */
{
    return __uint_as_float(((unsigned int)w[i]) << 16);
}

struct f16_t { unsigned short bits; };  /* float16 bits: a distinct type for overloading */

__device__ __forceinline__ float wload(const f16_t *w, long long i)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(w[i].bits));
    return f;
}

__device__ __forceinline__ float wload(const signed char *w, long long i) { return (float)w[i]; }
