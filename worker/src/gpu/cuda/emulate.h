// Just enough of CUDA, on the host, to run kernels.cu unchanged in tests on
// a machine without a GPU (emulate.cpp, built by build.rs for the `cuda`
// feature; the tests are in emulate.rs). Every CUDA thread of a block is an
// OS thread; blocks run one after another, so `__shared__` memory is a
// static that the running block's threads share. __syncthreads is a
// barrier of the block's threads, a warp shuffle an exchange through a
// per-warp array between two barriers of its 32 threads (a warp's lanes
// call it together, as the kernels do).
//
// What this checks: indexing, the synchronization structure (a missing
// __syncthreads or a shuffle some lanes skip deadlocks or reads stale
// values here too), and the arithmetic, in IEEE f32 as a GPU does it (with
// expf from libm instead of CUDA's, and no fused multiply-adds). What it
// cannot: timing, memory coalescing, races between blocks (which never
// overlap here).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

using std::min;

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;

struct Warp {
    float slot[32];
    std::barrier<> bar{32};
};

inline thread_local std::barrier<>* aq_block_barrier = nullptr;
inline thread_local Warp* aq_warp = nullptr;

inline void __syncthreads() { aq_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    const unsigned lane = threadIdx.x & 31;
    aq_warp->slot[lane] = v;
    aq_warp->bar.arrive_and_wait();
    const float other = aq_warp->slot[lane ^ (unsigned)mask];
    aq_warp->bar.arrive_and_wait();
    return other;
}

inline float __shfl_sync(unsigned, float v, int src) {
    const unsigned lane = threadIdx.x & 31;
    aq_warp->slot[lane] = v;
    aq_warp->bar.arrive_and_wait();
    const float other = aq_warp->slot[(unsigned)src & 31];
    aq_warp->bar.arrive_and_wait();
    return other;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// bf16 and f16 as their bits, converted with round-to-nearest-even as
// cuda_bf16.h and cuda_fp16.h do.
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
    const uint32_t u = (uint32_t)v.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}

inline float __half2float(__half v) {
    _Float16 h;
    std::memcpy(&h, &v.bits, 2);
    return (float)h;
}

inline __half __float2half_rn(float f) {
    const _Float16 h = (_Float16)f;
    __half v;
    std::memcpy(&v.bits, &h, 2);
    return v;
}

// Runs `kernel` over `grid` blocks of `block` threads (block a multiple of
// 32, as every launch in launch.rs is).
template <typename F>
void aq_launch(Dim3 grid, unsigned block, F kernel) {
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> bar(block);
                std::unique_ptr<Warp[]> warps(new Warp[(block + 31) / 32]);
                std::vector<std::thread> threads;
                threads.reserve(block);
                for (unsigned t = 0; t < block; t++)
                    threads.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        blockDim = {block, 1, 1};
                        gridDim = grid;
                        aq_block_barrier = &bar;
                        aq_warp = &warps[t / 32];
                        kernel();
                    });
                for (auto& t : threads) t.join();
            }
}
