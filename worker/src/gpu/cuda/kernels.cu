// The worker's CUDA kernels, compiled by nvcc in worker/build.rs into one
// fatbin. Each is a template over the element type T of weights, the KV
// cache and the inputs of matrix products (bf16 or f16), instantiated as
// `NAME_bf16` and `NAME_f16`. Activations between kernels stay f32 (the
// residual stream, q/k/v, matrix-product outputs); every sum is in f32.
//
// Layouts match the CPU engine:
//   - activations row-major `[rows][width]`; the fused products' rows are
//     [q | k | v] (heads, kv heads, kv heads × head_dim) and [gate | up];
//   - the paged KV cache of one layer `[block][kv_head][slot][head_dim]`;
//   - a block table per sequence, padded to `table_stride` entries.
// Launch parameters come from worker/src/gpu/launch.rs, which states what
// each kernel assumes (block sizes, head_dim limits) and is unit-tested.

#ifdef AQUILA_EMULATE
#include "emulate.h"  // the host emulation the tests run these kernels on
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<bf16>(bf16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<f16>(f16 v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ f16 from_f<f16>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = threadIdx.x < warps ? part[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) part[0] = v;
    __syncthreads();
    const float total = part[0];
    __syncthreads();
    return total;
}

// ---- embedding: one block per token ------------------------------------------
// This rank holds rows [vocab_start, vocab_start + vocab_len) of the table;
// ids outside give zeros, and the all-reduce over ranks completes them.
template <typename T>
__device__ void embedding(const uint32_t* ids, const T* table, uint32_t vocab_start,
                          uint32_t vocab_len, int hidden, float* out) {
    const uint32_t id = ids[blockIdx.x];
    const bool held = id >= vocab_start && id - vocab_start < vocab_len;
    const T* src = table + (size_t)(id - vocab_start) * hidden;
    float* dst = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = held ? to_f(src[i]) : 0.f;
}

// ---- RMSNorm with the residual add: one block per output row -----------------
// x[src] += delta[src] (when delta is set), then out[row] = x[src] / rms · w,
// where src = rows ? rows[row] : row (the final norm picks the rows whose
// logits are wanted).
template <typename T>
__device__ void rms_norm(float* x, const float* delta, const uint32_t* rows, const T* w,
                         float eps, int dim, T* out) {
    const size_t src = (size_t)(rows ? rows[blockIdx.x] : blockIdx.x) * dim;
    const size_t dst = (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = x[src + i];
        if (delta) {
            v += delta[src + i];
            x[src + i] = v;
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[dst + i] = from_f<T>(x[src + i] * inv * to_f(w[i]));
}

// ---- RoPE and the cache write, fused: one block per token ---------------------
// A row of qkv is [q: heads × head_dim | k: kv_heads × head_dim | v: same]
// (the fused q/k/v product). q is rotated in place; k is rotated and, with
// v, written into the token's cache slot: slots[t] = block id · block_size
// + offset, from the sequence's block table. cos/sin are the CPU engine's
// tables, [context][head_dim / 2]; pairs are (i, i + head_dim/2) or,
// interleaved (GGUF), (2i, 2i + 1).
template <typename T>
__device__ void rope_kv_write(float* qkv, const uint32_t* pos, const float* cos_t,
                              const float* sin_t, const uint32_t* slots, int heads, int kv_heads,
                              int head_dim, int interleaved, int block_size, T* cache_k,
                              T* cache_v) {
    const int half = head_dim / 2, q_width = heads * head_dim, kv_width = kv_heads * head_dim;
    const float* c = cos_t + (size_t)pos[blockIdx.x] * half;
    const float* s = sin_t + (size_t)pos[blockIdx.x] * half;
    float* row = qkv + (size_t)blockIdx.x * (q_width + 2 * kv_width);
    const uint32_t slot = slots[blockIdx.x];
    const size_t blk = slot / block_size, off = slot % block_size;
    // Where dim d of kv head h goes in the cache.
    auto at = [&](int h, int d) {
        return ((blk * kv_heads + h) * block_size + off) * head_dim + d;
    };
    for (int j = threadIdx.x; j < (heads + kv_heads) * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        const bool is_k = h >= heads;
        float* v = row + (size_t)h * head_dim;  // k's heads follow q's in the row
        const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        const float x0 = v[a], x1 = v[b];
        const float y0 = x0 * c[i] - x1 * s[i], y1 = x0 * s[i] + x1 * c[i];
        if (is_k) {
            cache_k[at(h - heads, a)] = from_f<T>(y0);
            cache_k[at(h - heads, b)] = from_f<T>(y1);
        } else {
            v[a] = y0;
            v[b] = y1;
        }
    }
    const float* vs = row + q_width + kv_width;
    for (int j = threadIdx.x; j < kv_width; j += blockDim.x)
        cache_v[at(j / head_dim, j % head_dim)] = from_f<T>(vs[j]);
}

// ---- paged attention ------------------------------------------------------------
// Every query row (a decode token, or one token of a prefill chunk) attends
// the keys at positions 0..=row_pos[r] of its sequence (causal), read in place
// from the paged cache: no gather, no score matrix. Grid (rows, heads,
// splits): split z covers keys [z·partition, (z+1)·partition), so a long
// context is spread over many blocks; each block's warps take turns of
// KEYS_AT_ONCE keys with an online softmax, merge in shared memory, and
// write the split's (max, sum, weighted values); attention_merge combines the
// splits. With one split (max_splits == 1) the block writes the row's output
// itself and no merge runs. Rows of q are q_stride floats apart (q is the
// first part of the fused q/k/v product's row). Query head h reads kv head
// h / (heads / kv_heads) (grouped-query).
// head_dim is a multiple of 32, at most 256: lane l holds dims l, l+32, ...
#define MAX_PER_LANE 8
#define MAX_WARPS 8
#define KEYS_AT_ONCE 4

template <typename T>
__device__ void attention(const float* q, const T* cache_k, const T* cache_v,
                          const uint32_t* row_seq, const uint32_t* row_pos,
                          const uint32_t* tables, int table_stride, int heads, int kv_heads,
                          int head_dim, int block_size, int partition, int max_splits,
                          int q_stride, float scale, float* part_m, float* part_l,
                          float* part_acc, T* out) {
    const int r = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
    const int keys = (int)row_pos[r] + 1;
    const int k0 = split * partition;
    if (k0 >= keys) return;
    const int k1 = min(keys, k0 + partition);
    const int kvh = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int per_lane = head_dim >> 5;
    const uint32_t* table = tables + (size_t)row_seq[r] * table_stride;
    const float* qr = q + (size_t)r * q_stride + (size_t)h * head_dim;

    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        qv[i] = i < per_lane ? qr[lane + 32 * i] * scale : 0.f;
        acc[i] = 0.f;
    }
    // A warp takes KEYS_AT_ONCE keys per turn, their loads independent, so
    // that a short split (decode at small batch) waits on memory once per
    // turn rather than once per key.
    float m = -INFINITY, l = 0.f;
    for (int k = k0 + warp * KEYS_AT_ONCE; k < k1; k += warps * KEYS_AT_ONCE) {
        size_t base[KEYS_AT_ONCE];
        float s[KEYS_AT_ONCE];
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            const int kk = min(k + u, k1 - 1);  // past the split: a copy of its last key, masked below
            base[u] = (((size_t)table[kk / block_size] * kv_heads + kvh) * block_size +
                       kk % block_size) * head_dim;
            s[u] = 0.f;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++)
                if (i < per_lane) s[u] += qv[i] * to_f(cache_k[base[u] + lane + 32 * i]);
        }
        float m_new = m;
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            s[u] = k + u < k1 ? warp_sum(s[u]) : -INFINITY;
            m_new = fmaxf(m_new, s[u]);
        }
        const float corr = expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < KEYS_AT_ONCE; u++) {
            const float e = expf(s[u] - m_new);  // 0 for a masked key
            l += e;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++)
                if (i < per_lane) acc[i] += e * to_f(cache_v[base[u] + lane + 32 * i]);
        }
        m = m_new;
    }

    __shared__ float sm_m[MAX_WARPS], sm_l[MAX_WARPS];
    __shared__ float sm_acc[MAX_WARPS][32 * MAX_PER_LANE];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++)
        if (i < per_lane) sm_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < warps; w++) mx = fmaxf(mx, sm_m[w]);
    const size_t at = ((size_t)r * heads + h) * max_splits + split;
    if (max_splits == 1) {
        float sum = 0.f;
        for (int w = 0; w < warps; w++) sum += sm_l[w] * expf(sm_m[w] - mx);
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float a = 0.f;
            for (int w = 0; w < warps; w++) a += sm_acc[w][d] * expf(sm_m[w] - mx);
            out[at * head_dim + d] = from_f<T>(a / sum);
        }
        return;
    }
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int w = 0; w < warps; w++) sum += sm_l[w] * expf(sm_m[w] - mx);
        part_m[at] = mx;
        part_l[at] = sum;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < warps; w++) a += sm_acc[w][d] * expf(sm_m[w] - mx);
        part_acc[at * head_dim + d] = a;
    }
}

// Combines a row's splits: out = Σ e^(m_s − M) acc_s / Σ e^(m_s − M) l_s.
// Grid (rows, heads), head_dim threads (rounded up to a warp).
template <typename T>
__device__ void attention_merge(const float* part_m, const float* part_l, const float* part_acc,
                                const uint32_t* row_pos, int heads, int head_dim, int partition,
                                int max_splits, T* out) {
    const int r = blockIdx.x, h = blockIdx.y;
    const int splits = ((int)row_pos[r] + partition) / partition;
    const size_t at = ((size_t)r * heads + h) * max_splits;
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, part_m[at + s]);
    float sum = 0.f;
    for (int s = 0; s < splits; s++) sum += part_l[at + s] * expf(part_m[at + s] - mx);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++)
            a += part_acc[(at + s) * head_dim + d] * expf(part_m[at + s] - mx);
        out[((size_t)r * heads + h) * head_dim + d] = from_f<T>(a / sum);
    }
}

// ---- causal attention for prefill chunks: a tile of query rows per block ---------
// Flash-attention style on CUDA cores: a block (4 warps) takes up to
// PREFILL_ROWS consecutive rows of one sequence's chunk (tiles[2b] = first
// row, tiles[2b + 1] = count) for one head, and walks its keys in tiles of
// 32 read once into shared memory for all of its rows, with an online
// softmax per row: no score matrix, and each key read once per tile of
// rows instead of once per row. Lane j scores key j of a tile; the
// weighted values are summed with each lane holding dims lane, lane + 32,
// ... Keys past a row's position are masked (causal). head_dim ≤ 128.
#define PREFILL_ROWS 16
#define PREFILL_KEYS 32
#define PREFILL_MAX_HEAD_DIM 128
#define PREFILL_WARPS 4

template <typename T>
__device__ void attention_prefill(const float* q, int q_stride, const T* cache_k,
                                  const T* cache_v, const uint32_t* row_seq,
                                  const uint32_t* row_pos, const uint32_t* tables,
                                  int table_stride, const uint32_t* tiles, int heads,
                                  int kv_heads, int head_dim, int block_size, float scale,
                                  T* out) {
    __shared__ float sq[PREFILL_ROWS][PREFILL_MAX_HEAD_DIM];
    __shared__ float sk[PREFILL_KEYS][PREFILL_MAX_HEAD_DIM + 1];  // +1: lanes hit distinct banks
    __shared__ float sv[PREFILL_KEYS][PREFILL_MAX_HEAD_DIM];
    constexpr int ROWS = PREFILL_ROWS / PREFILL_WARPS;  // per warp: rows warp, warp + 4, ...
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int r0 = (int)tiles[2 * blockIdx.x], nq = (int)tiles[2 * blockIdx.x + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int per_lane = head_dim >> 5;
    const uint32_t* table = tables + (size_t)row_seq[r0] * table_stride;
    const int p0 = (int)row_pos[r0];
    const int keys = p0 + nq;  // the tile's last row sees keys 0..keys-1
    for (int i = threadIdx.x; i < nq * head_dim; i += blockDim.x) {
        const int rr = i / head_dim, d = i % head_dim;
        sq[rr][d] = q[(size_t)(r0 + rr) * q_stride + (size_t)h * head_dim + d] * scale;
    }
    float m[ROWS], l[ROWS], acc[ROWS][MAX_PER_LANE];
#pragma unroll
    for (int w = 0; w < ROWS; w++) {
        m[w] = -INFINITY;
        l[w] = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) acc[w][i] = 0.f;
    }
    for (int kb = 0; kb < keys; kb += PREFILL_KEYS) {
        __syncthreads();  // q is in place; the last tile's keys are read
        for (int i = threadIdx.x; i < PREFILL_KEYS * head_dim; i += blockDim.x) {
            const int j = i / head_dim, d = i % head_dim, k = kb + j;
            float kv = 0.f, vv = 0.f;
            if (k < keys) {
                const size_t at =
                    (((size_t)table[k / block_size] * kv_heads + kvh) * block_size + k % block_size) *
                        head_dim + d;
                kv = to_f(cache_k[at]);
                vv = to_f(cache_v[at]);
            }
            sk[j][d] = kv;
            sv[j][d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < ROWS; w++) {
            const int rr = warp + w * PREFILL_WARPS;
            const int last = p0 + rr;  // the row's last key
            if (rr >= nq || kb > last) continue;  // the same for the whole warp
            const int k = kb + lane;
            float s = -INFINITY;
            if (k <= last) {
                s = 0.f;
                for (int d = 0; d < head_dim; d++) s += sq[rr][d] * sk[lane][d];
            }
            const float m_new = fmaxf(m[w], warp_max(s));
            const float corr = expf(m[w] - m_new);
            const float p = k <= last ? expf(s - m_new) : 0.f;
            l[w] = l[w] * corr + warp_sum(p);
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++) acc[w][i] *= corr;
            const int n = min(PREFILL_KEYS, last - kb + 1);
            for (int j = 0; j < n; j++) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; i++)
                    if (i < per_lane) acc[w][i] += pj * sv[j][lane + 32 * i];
            }
            m[w] = m_new;
        }
    }
#pragma unroll
    for (int w = 0; w < ROWS; w++) {
        const int rr = warp + w * PREFILL_WARPS;
        if (rr >= nq) continue;
        T* o = out + ((size_t)(r0 + rr) * heads + h) * head_dim;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++)
            if (i < per_lane) o[lane + 32 * i] = from_f<T>(acc[w][i] / l[w]);
    }
}

// ---- greedy picks: the largest logit of each row -----------------------------
// One block per row of n logits; the lowest index wins a tie, NaN never
// wins, a row with nothing above -inf gives 0 (as the host's argmax).
// blockDim.x = ARGMAX_THREADS.
#define ARGMAX_THREADS 256

__device__ void argmax_rows_impl(const float* logits, int n, uint32_t* out) {
    __shared__ float best_v[ARGMAX_THREADS];
    __shared__ int best_i[ARGMAX_THREADS];
    const float* row = logits + (size_t)blockIdx.x * n;
    float v = -INFINITY;
    int at = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (row[i] > v || (at == 0x7fffffff && row[i] == v)) {
            v = row[i];
            at = i;
        }
    best_v[threadIdx.x] = v;
    best_i[threadIdx.x] = at;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if ((int)threadIdx.x < half) {
            const float ov = best_v[threadIdx.x + half];
            const int oi = best_i[threadIdx.x + half];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] == 0x7fffffff ? 0 : (uint32_t)best_i[0];
}

extern "C" __global__ void argmax_rows(const float* logits, int n, uint32_t* out) {
    argmax_rows_impl(logits, n, out);
}

// ---- SiLU(gate) · up, into the input of the down projection ----------------------
// A row of gate_up is [gate: inter | up: inter] (the fused product); out is
// [rows][inter], n = rows · inter.
template <typename T>
__device__ void silu_mul(const float* gate_up, int inter, size_t n, T* out) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter, j = i % inter;
        const float g = gate_up[r * 2 * inter + j], u = gate_up[r * 2 * inter + inter + j];
        out[i] = from_f<T>(g / (1.f + expf(-g)) * u);
    }
}

// ---- random weights (the GPU check's model) ---------------------------------------
// out[i] = center + scale · u, u uniform in [-1, 1) from a hash of (seed, i):
// the same values for a seed on every GPU, with no download.
__device__ __forceinline__ float uniform(uint64_t seed, uint64_t i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + i;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (2.f / 16777216.f) - 1.f;
}

template <typename T>
__device__ void fill_random(T* out, size_t n, uint64_t seed, float center, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_f<T>(center + scale * uniform(seed, i));
}

#define INSTANTIATE(T, S)                                                                      \
    extern "C" __global__ void embedding_##S(const uint32_t* ids, const T* table,               \
                                             uint32_t vocab_start, uint32_t vocab_len,          \
                                             int hidden, float* out) {                          \
        embedding<T>(ids, table, vocab_start, vocab_len, hidden, out);                          \
    }                                                                                           \
    extern "C" __global__ void rms_norm_##S(float* x, const float* delta, const uint32_t* rows, \
                                            const T* w, float eps, int dim, T* out) {           \
        rms_norm<T>(x, delta, rows, w, eps, dim, out);                                          \
    }                                                                                           \
    extern "C" __global__ void rope_kv_write_##S(                                               \
        float* qkv, const uint32_t* pos, const float* cos_t, const float* sin_t,                \
        const uint32_t* slots, int heads, int kv_heads, int head_dim, int interleaved,          \
        int block_size, T* cache_k, T* cache_v) {                                               \
        rope_kv_write<T>(qkv, pos, cos_t, sin_t, slots, heads, kv_heads, head_dim, interleaved, \
                         block_size, cache_k, cache_v);                                         \
    }                                                                                           \
    extern "C" __global__ void attention_##S(                                                   \
        const float* q, const T* cache_k, const T* cache_v, const uint32_t* row_seq,            \
        const uint32_t* row_pos, const uint32_t* tables, int table_stride, int heads,           \
        int kv_heads, int head_dim, int block_size, int partition, int max_splits,              \
        int q_stride, float scale, float* part_m, float* part_l, float* part_acc, T* out) {     \
        attention<T>(q, cache_k, cache_v, row_seq, row_pos, tables, table_stride, heads,        \
                     kv_heads, head_dim, block_size, partition, max_splits, q_stride, scale,    \
                     part_m, part_l, part_acc, out);                                            \
    }                                                                                           \
    extern "C" __global__ void attention_prefill_##S(                                           \
        const float* q, int q_stride, const T* cache_k, const T* cache_v,                       \
        const uint32_t* row_seq, const uint32_t* row_pos, const uint32_t* tables,               \
        int table_stride, const uint32_t* tiles, int heads, int kv_heads, int head_dim,         \
        int block_size, float scale, T* out) {                                                  \
        attention_prefill<T>(q, q_stride, cache_k, cache_v, row_seq, row_pos, tables,           \
                             table_stride, tiles, heads, kv_heads, head_dim, block_size, scale, \
                             out);                                                              \
    }                                                                                           \
    extern "C" __global__ void attention_merge_##S(                                             \
        const float* part_m, const float* part_l, const float* part_acc,                        \
        const uint32_t* row_pos, int heads, int head_dim, int partition, int max_splits,        \
        T* out) {                                                                               \
        attention_merge<T>(part_m, part_l, part_acc, row_pos, heads, head_dim, partition,       \
                           max_splits, out);                                                    \
    }                                                                                           \
    extern "C" __global__ void silu_mul_##S(const float* gate_up, int inter, size_t n, T* out) { \
        silu_mul<T>(gate_up, inter, n, out);                                                    \
    }                                                                                           \
    extern "C" __global__ void fill_random_##S(T* out, size_t n, uint64_t seed, float center,   \
                                               float scale) {                                   \
        fill_random<T>(out, n, seed, center, scale);                                            \
    }

INSTANTIATE(bf16, bf16)
INSTANTIATE(f16, f16)
