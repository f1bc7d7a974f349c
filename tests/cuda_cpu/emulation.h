/* Run CUDA kernels on the CPU, as written: every thread of a block is a fiber
 * on one OS thread (a six-register stack switch on x86-64, ucontext elsewhere); __syncthreads and the warp shuffles are barriers
 * among the block's (or the warp's) threads that have not returned; blocks run
 * one after another, so `__shared__` (a static) is the running block's.  Each
 * round resumes the threads in a new pseudo-random order, and skips a random
 * quarter of them (so threads drift apart), so code that needs a barrier it
 * lacks reads values not yet written, or already overwritten.
 *
 * What it checks: indexing, bounds, barriers (a missing one reads a value not
 * yet written; a deadlock aborts), warp reductions, the numerics in float32.
 * What it cannot: timing, real concurrency between blocks, memory coalescing.
 * Used by tests/cuda_cpu/__init__.py, which builds each kernel file with g++. */

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>
#include <algorithm>

struct dim3 { unsigned x, y, z; };

#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
extern "C" void emu_switch(void **save_sp, void *next_sp);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#define EMU_FAST_SWITCH 1
#endif

namespace emu {
struct Fiber {
    ucontext_t ctx;
    void *sp;
    dim3 tid;
    int warp, done;
};
struct Barrier { int arrived; long gen; };

inline ucontext_t scheduler;
inline void *scheduler_sp;
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline Fiber *cur;
inline dim3 bid, bdim, gdim;
inline std::function<void()> body;
inline Barrier block_bar;
inline std::vector<Barrier> warp_bars;
inline std::vector<int> warp_alive;
inline int block_alive;
inline std::vector<float> xchg;
inline std::vector<char> dyn_shared;
inline long yields;
inline uint64_t random_state = 0x9E3779B97F4A7C15ull;
inline uint64_t next_random() {  /* xorshift64: the same schedule on every run */
    random_state ^= random_state << 13;
    random_state ^= random_state >> 7;
    random_state ^= random_state << 17;
    return random_state;
}
inline const char *failure;

inline void to_scheduler() {
#ifdef EMU_FAST_SWITCH
    emu_switch(&cur->sp, scheduler_sp);
#else
    swapcontext(&cur->ctx, &scheduler);
#endif
}
inline void yield() {
    if (++yields > 400000000L) { failure = "deadlock or runaway loop"; }
    to_scheduler();
}
inline void release_if_complete(Barrier &b, int alive) {
    if (b.arrived > 0 && b.arrived >= alive) { b.arrived = 0; ++b.gen; }
}
inline void wait(Barrier &b, int &alive) {
    const long g = b.gen;
    ++b.arrived;
    release_if_complete(b, alive);
    while (b.gen == g && !failure) yield();
}
inline void syncthreads() { wait(block_bar, block_alive); }
inline void syncwarp() { wait(warp_bars[cur->warp], warp_alive[cur->warp]); }

inline void entry() {
    body();
    cur->done = 1;
    --block_alive;
    --warp_alive[cur->warp];
    release_if_complete(block_bar, block_alive);
    release_if_complete(warp_bars[cur->warp], warp_alive[cur->warp]);
}

inline void trampoline() {
    entry();
    to_scheduler();  /* never resumed */
    std::abort();
}

inline void start(Fiber &f, std::vector<char> &stack) {
#ifdef EMU_FAST_SWITCH
    /* a stack emu_switch pops six registers from, then "returns" into trampoline */
    uintptr_t top = ((uintptr_t)(stack.data() + stack.size())) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;               /* trampoline's return address: never used */
    *--sp = (void *)&trampoline;
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack.data();
    f.ctx.uc_stack.ss_size = stack.size();
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, trampoline, 0);
#endif
}

inline void resume(Fiber &f) {
    cur = &f;
#ifdef EMU_FAST_SWITCH
    emu_switch(&scheduler_sp, f.sp);
#else
    swapcontext(&scheduler, &f.ctx);
#endif
}

inline const char *launch(dim3 grid, dim3 block, size_t shmem, std::function<void()> fn) {
    const int n = block.x * block.y * block.z, n_warps = (n + 31) / 32;
    failure = nullptr;
    yields = 0;
    body = fn;
    bdim = block;
    gdim = grid;
    fibers.assign(n, Fiber{});
    if ((int)stacks.size() < n) stacks.resize(n);
    for (auto &s : stacks) s.resize(1 << 16);
    dyn_shared.assign(shmem + 16, 0x7f);  /* garbage, not zeros */
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                bid = dim3{bx, by, bz};
                block_bar = Barrier{0, 0};
                warp_bars.assign(n_warps, Barrier{0, 0});
                warp_alive.assign(n_warps, 0);
                xchg.assign(32 * n_warps, NAN);
                block_alive = n;
                for (int t = 0; t < n; ++t) {
                    Fiber &f = fibers[t];
                    f.tid = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                    f.warp = t / 32;
                    f.done = 0;
                    ++warp_alive[f.warp];
                    start(f, stacks[t]);
                }
                std::vector<int> order(n);
                for (int t = 0; t < n; ++t) order[t] = t;
                for (int left = n; left > 0 && !failure;) {
                    left = 0;
                    for (int t = n - 1; t > 0; --t) std::swap(order[t], order[next_random() % (t + 1)]);
                    for (int t : order) {
                        Fiber &f = fibers[t];
                        if (f.done) continue;
                        if ((next_random() & 3) == 0) { ++left; continue; }  /* a quarter wait: threads drift apart */
                        resume(f);
                        left += !f.done;
                    }
                }
                if (failure) return failure;
            }
    return nullptr;
}

inline float shfl_xor(float v, int o) {
    const int lane = (int)((cur - fibers.data()) % 32), base = cur->warp * 32;
    xchg[base + lane] = v;
    syncwarp();
    const float r = xchg[base + (lane ^ o)];
    syncwarp();
    return r;
}

inline float half_to_float(unsigned short h) {
    const unsigned sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
    float f;
    if (exp == 0) f = std::ldexp((float)man, -24);
    else if (exp == 31) f = man ? NAN : INFINITY;
    else f = std::ldexp((float)(man | 1024), (int)exp - 25);
    return sign ? -f : f;
}
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (emu::cur->tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor((v), (o))
using std::min;
using std::max;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
