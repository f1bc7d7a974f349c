/* Prepended to every program.  The host picks the vector width VW per
 * device: 16 for CPUs, where one work-item's vector is the SIMD register,
 * and 4 for GPUs, where neighbouring work-items already coalesce.
 *
 * LOADG/STOREG/LOADL/STOREL move VW floats to or from global or local
 * memory at any 4-byte alignment.  They are vloadN/vstoreN, except under
 * PACKED_VECTORS (set for PoCL): there those built-ins are out-of-line calls
 * that block vectorisation, while a dereference through an under-aligned
 * vector type compiles to one unaligned SIMD move (a clang extension). */
#if VW == 16
typedef float16 vecf;
#define VLOADN vload16
#define VSTOREN vstore16
inline float hsum(float16 v) { float8 a = v.lo + v.hi; float4 b = a.lo + a.hi; return (b.x + b.y) + (b.z + b.w); }
#elif VW == 8
typedef float8 vecf;
#define VLOADN vload8
#define VSTOREN vstore8
inline float hsum(float8 v) { float4 b = v.lo + v.hi; return (b.x + b.y) + (b.z + b.w); }
#elif VW == 4
typedef float4 vecf;
#define VLOADN vload4
#define VSTOREN vstore4
inline float hsum(float4 b) { return (b.x + b.y) + (b.z + b.w); }
#else
#error "VW must be 4, 8 or 16"
#endif

#ifdef PACKED_VECTORS
typedef vecf vecf_u __attribute__((aligned(4)));
#define LOADG(p) (*(const __global vecf_u *)(p))
#define LOADL(p) (*(const __local vecf_u *)(p))
#define STOREG(v, p) (*(__global vecf_u *)(p) = (v))
#define STOREL(v, p) (*(__local vecf_u *)(p) = (v))
#else
#define LOADG(p) VLOADN(0, p)
#define LOADL(p) VLOADN(0, p)
#define STOREG(v, p) VSTOREN(v, 0, p)
#define STOREL(v, p) VSTOREN(v, 0, p)
#endif

/* Work-group reductions over get_local_size(0) (a power of two) values, one
 * per work-item, through `red` (that many floats of local memory).  Every
 * work-item of the group must call them; all get the result. */
inline float group_sum(__local float *red, float x)
{
    const int lid = get_local_id(0);
    red[lid] = x;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = get_local_size(0) / 2; step > 0; step /= 2) {
        if (lid < step) red[lid] += red[lid + step];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float r = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);  /* red may be reused at once */
    return r;
}

inline float group_max(__local float *red, float x)
{
    const int lid = get_local_id(0);
    red[lid] = x;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = get_local_size(0) / 2; step > 0; step /= 2) {
        if (lid < step) red[lid] = fmax(red[lid], red[lid + step]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float r = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}
