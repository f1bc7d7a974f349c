/* Matrix products.  Sizes are kernel arguments, so one binary serves every
 * shape; tile shapes (GEMM_*, GEMMT_*, GEMV_*, GEMVT_*) are fixed per device at
 * build time.  All matrices are row-major and contiguous.
 *
 *   gemm    C[M,N] = A[M,K] @ B[K,N] (+ bias[N])
 *   gemm_nt C[M,N] = A[M,K] @ B[N,K]ᵀ (+ bias[N])   e.g. logits = x @ wteᵀ
 *   gemv    y[N]   = x[K] @ w[K,N] (+ bias)   decode: read w once, along rows
 *   gemv_t  y[N]   = w[N,K] @ x[K] (+ bias)   decode with a transposed w (lm_head)
 */

/* ---- GEMM: local-memory tiles, each work-item owns a GEMM_WM x (GEMM_WC*VW)
 * register block.  Tile = (GEMM_LY*GEMM_WM) rows x (GEMM_LX*GEMM_WC*VW) cols. */
#define TM (GEMM_LY * GEMM_WM)
#define TN (GEMM_LX * GEMM_WC * VW)
#define TK GEMM_TK
#define NTHREADS (GEMM_LX * GEMM_LY)

/* Rows [r0, r0 + rows) x columns [k0, k0 + tk) of the row-major [R, K]
 * matrix X into the local tile T (row stride tk), zero-filled outside X:
 * vector loads along K, consecutive work-items on consecutive vectors. */
inline void load_k_tile(__local float *T, const int tk, __global const float *X, const int rows,
                        const int r0, const int R, const int k0, const int K, const int lid,
                        const int nthreads)
{
    for (int i = lid; i < rows * (tk / VW); i += nthreads) {
        const int rr = i / (tk / VW), kk = (i % (tk / VW)) * VW;
        const int r = r0 + rr, k = k0 + kk;
        __local float *t = T + rr * tk + kk;
        if (r < R && k + VW <= K) {
            STOREL(LOADG(X + (size_t)r * K + k), t);
        } else {
            for (int j = 0; j < VW; ++j) t[j] = (r < R && k + j < K) ? X[(size_t)r * K + k + j] : 0.0f;
        }
    }
}

__kernel __attribute__((reqd_work_group_size(GEMM_LX, GEMM_LY, 1)))
void gemm(__global const float *A, __global const float *B, __global const float *bias,
          __global float *C, const int M, const int N, const int K,
          const int has_bias)
{
    __local float As[TM][TK];
    __local float Bs[TK][TN];
    const int lx = get_local_id(0), ly = get_local_id(1);
    const int lid = ly * GEMM_LX + lx;
    const int m0 = get_group_id(1) * TM, n0 = get_group_id(0) * TN;
    const bool full_n = n0 + TN <= N;

    vecf acc[GEMM_WM][GEMM_WC];
    #pragma unroll
    for (int r = 0; r < GEMM_WM; ++r) {
        #pragma unroll
        for (int c = 0; c < GEMM_WC; ++c) acc[r][c] = 0.0f;
    }

    for (int k0 = 0; k0 < K; k0 += TK) {
        const bool full_k = k0 + TK <= K;
        load_k_tile(&As[0][0], TK, A, TM, m0, M, k0, K, lid, NTHREADS);
        if (full_n && full_k) {  /* the common case: whole vectors along N */
            for (int i = lid; i < TK * (TN / VW); i += NTHREADS) {
                const int kk = i / (TN / VW), nn = (i % (TN / VW)) * VW;
                STOREL(LOADG(B + (size_t)(k0 + kk) * N + n0 + nn), &Bs[kk][nn]);
            }
        } else {
            for (int i = lid; i < TK * TN; i += NTHREADS) {
                const int kk = i / TN, n = n0 + i % TN, k = k0 + kk;
                Bs[kk][i % TN] = (n < N && k < K) ? B[(size_t)k * N + n] : 0.0f;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TK; ++kk) {
            vecf b[GEMM_WC];
            #pragma unroll
            for (int c = 0; c < GEMM_WC; ++c)
                b[c] = LOADL(&Bs[kk][(c * GEMM_LX + lx) * VW]);
            #pragma unroll
            for (int r = 0; r < GEMM_WM; ++r) {
                const vecf a = As[ly * GEMM_WM + r][kk];
                #pragma unroll
                for (int c = 0; c < GEMM_WC; ++c) acc[r][c] += a * b[c];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    #pragma unroll
    for (int c = 0; c < GEMM_WC; ++c) {
        const int n = n0 + (c * GEMM_LX + lx) * VW;
        if (n >= N) continue;
        const bool whole = n + VW <= N;
        float bv[VW];
        #pragma unroll
        for (int j = 0; j < VW; ++j) bv[j] = (has_bias && n + j < N) ? bias[n + j] : 0.0f;
        #pragma unroll
        for (int r = 0; r < GEMM_WM; ++r) {
            const int m = m0 + ly * GEMM_WM + r;
            if (m >= M) break;
            const vecf v = acc[r][c] + VLOADN(0, bv);
            if (whole) {
                STOREG(v, C + (size_t)m * N + n);
            } else {
                float t[VW];
                VSTOREN(v, 0, t);
                for (int j = 0; n + j < N; ++j) C[(size_t)m * N + n + j] = t[j];
            }
        }
    }
}

/* ---- GEMM with B transposed: both operands are contiguous along K, so
 * tiles are loaded as vectors along K and each work-item keeps a
 * GEMMT_WM x GEMMT_WN block of dot products as vectors along K, summed at
 * the end.  Tile = (GEMMT_LY*GEMMT_WM) x (GEMMT_LX*GEMMT_WN) x GEMMT_TK. */
#define TTM (GEMMT_LY * GEMMT_WM)
#define TTN (GEMMT_LX * GEMMT_WN)
#define TTK GEMMT_TK
#define TNTHREADS (GEMMT_LX * GEMMT_LY)

__kernel __attribute__((reqd_work_group_size(GEMMT_LX, GEMMT_LY, 1)))
void gemm_nt(__global const float *A, __global const float *B, __global const float *bias,
             __global float *C, const int M, const int N, const int K, const int has_bias)
{
    __local float As[TTM][TTK];
    __local float Bs[TTN][TTK];
    const int lx = get_local_id(0), ly = get_local_id(1);
    const int lid = ly * GEMMT_LX + lx;
    const int m0 = get_group_id(1) * TTM, n0 = get_group_id(0) * TTN;

    vecf acc[GEMMT_WM][GEMMT_WN];
    #pragma unroll
    for (int r = 0; r < GEMMT_WM; ++r) {
        #pragma unroll
        for (int c = 0; c < GEMMT_WN; ++c) acc[r][c] = 0.0f;
    }

    for (int k0 = 0; k0 < K; k0 += TTK) {
        load_k_tile(&As[0][0], TTK, A, TTM, m0, M, k0, K, lid, TNTHREADS);
        load_k_tile(&Bs[0][0], TTK, B, TTN, n0, N, k0, K, lid, TNTHREADS);
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TTK; kk += VW) {
            vecf a[GEMMT_WM];
            #pragma unroll
            for (int r = 0; r < GEMMT_WM; ++r) a[r] = LOADL(&As[ly * GEMMT_WM + r][kk]);
            #pragma unroll
            for (int c = 0; c < GEMMT_WN; ++c) {
                const vecf b = LOADL(&Bs[lx * GEMMT_WN + c][kk]);
                #pragma unroll
                for (int r = 0; r < GEMMT_WM; ++r) acc[r][c] += a[r] * b;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    #pragma unroll
    for (int r = 0; r < GEMMT_WM; ++r) {
        const int m = m0 + ly * GEMMT_WM + r;
        #pragma unroll
        for (int c = 0; c < GEMMT_WN; ++c) {
            const int n = n0 + lx * GEMMT_WN + c;
            if (m < M && n < N) C[(size_t)m * N + n] = hsum(acc[r][c]) + (has_bias ? bias[n] : 0.0f);
        }
    }
}

/* ---- GEMV, w [K,N]: a work-group owns GEMV_COLS contiguous output columns;
 * its GEMV_LX work-items read GEMV_WC vectors of each row of w side by side
 * (coalesced), and GEMV_LY work-items split K, summed through local memory.
 * Element i of a work-item's out[] is column n0 + GEMV_COL(i). */
#define GEMV_COLS (GEMV_LX * GEMV_WC * VW)
#define GEMV_COL(i) ((((i) / VW) * GEMV_LX + lx) * VW + (i) % VW)

__kernel __attribute__((reqd_work_group_size(GEMV_LX, GEMV_LY, 1)))
void gemv(__global const float *x, __global const float *w, __global const float *bias,
          __global float *y, const int K, const int N, const int has_bias)
{
    __local float part[GEMV_LY][GEMV_COLS];
    const int lx = get_local_id(0), ly = get_local_id(1);
    const int n0 = get_group_id(0) * GEMV_COLS;
    const int chunk = (K + GEMV_LY - 1) / GEMV_LY;
    const int k0 = ly * chunk, k1 = min(K, k0 + chunk);
    float out[GEMV_WC * VW];

    if (n0 + GEMV_COL(GEMV_WC * VW - 1) < N) {  /* every column in range: whole vectors */
        vecf acc[GEMV_WC];
        #pragma unroll
        for (int c = 0; c < GEMV_WC; ++c) acc[c] = 0.0f;
        const __global float *row = w + (size_t)k0 * N + n0 + lx * VW;
        for (int k = k0; k < k1; ++k, row += N) {
            const vecf xk = x[k];
            #pragma unroll
            for (int c = 0; c < GEMV_WC; ++c) acc[c] += xk * LOADG(row + c * GEMV_LX * VW);
        }
        #pragma unroll
        for (int c = 0; c < GEMV_WC; ++c) VSTOREN(acc[c], c, out);
    } else {  /* the ragged right edge: one column at a time */
        for (int i = 0; i < GEMV_WC * VW; ++i) {
            const int n = n0 + GEMV_COL(i);
            float s = 0.0f;
            if (n < N)
                for (int k = k0; k < k1; ++k) s += x[k] * w[(size_t)k * N + n];
            out[i] = s;
        }
    }

    if (GEMV_LY > 1) {
        for (int i = 0; i < GEMV_WC * VW; ++i) part[ly][GEMV_COL(i)] = out[i];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = 0; i < GEMV_WC * VW; ++i) {
            float s = 0.0f;
            for (int l = 0; l < GEMV_LY; ++l) s += part[l][GEMV_COL(i)];
            out[i] = s;
        }
    }
    if (ly == 0) {
        for (int i = 0; i < GEMV_WC * VW; ++i) {
            const int n = n0 + GEMV_COL(i);
            if (n < N) y[n] = out[i] + (has_bias ? bias[n] : 0.0f);
        }
    }
}

/* ---- GEMV, w [N,K] (y = w @ x): each output is a dot product along a
 * contiguous row.  A work-group owns GEMVT_LY rows; GEMVT_LX work-items
 * share each row (strided vectors, then a local-memory sum). */
__kernel __attribute__((reqd_work_group_size(GEMVT_LX, GEMVT_LY, 1)))
void gemv_t(__global const float *x, __global const float *w, __global const float *bias,
            __global float *y, const int K, const int N, const int has_bias)
{
    __local float part[GEMVT_LY][GEMVT_LX];
    const int lx = get_local_id(0), ly = get_local_id(1);
    const int n = get_group_id(0) * GEMVT_LY + ly;
    float s = 0.0f;
    if (n < N) {
        const __global float *row = w + (size_t)n * K;
        vecf acc = 0.0f;
        int k = lx * VW;
        for (; k + VW <= K; k += GEMVT_LX * VW) acc += LOADG(x + k) * LOADG(row + k);
        s = hsum(acc);
        for (k = (K / VW) * VW + lx; k < K; k += GEMVT_LX) s += x[k] * row[k];
    }
    if (GEMVT_LX > 1) {
        part[ly][lx] = s;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int step = GEMVT_LX / 2; step > 0; step /= 2) {
            if (lx < step) part[ly][lx] += part[ly][lx + step];
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        s = part[ly][0];
    }
    if (lx == 0 && n < N) y[n] = s + (has_bias ? bias[n] : 0.0f);
}

/* ---- out[C,R] = x[R,C]ᵀ through a local tile, so reads and writes are both
 * row-contiguous.  On CPUs, A @ Bᵀ for many rows runs faster as a
 * transpose plus gemm than as gemm_nt (the host decides, NT_VIA_GEMM_M). */
__kernel __attribute__((reqd_work_group_size(TR_T, TR_T, 1)))
void transpose(__global const float *x, __global float *out, const int R, const int C)
{
    __local float tile[TR_T][TR_T + 1];
    const int lx = get_local_id(0), ly = get_local_id(1);
    const int r0 = get_group_id(1) * TR_T, c0 = get_group_id(0) * TR_T;
    if (r0 + ly < R && c0 + lx < C) tile[ly][lx] = x[(size_t)(r0 + ly) * C + c0 + lx];
    barrier(CLK_LOCAL_MEM_FENCE);
    if (c0 + ly < C && r0 + lx < R) out[(size_t)(c0 + ly) * R + r0 + lx] = tile[lx][ly];
}
