// kernels.cu on the host (see emulate.h): one C entry point per kernel and
// element type, `emu_NAME_SUFFIX(grid, block, the kernel's arguments)`,
// for the tests in emulate.rs.
#define AQUILA_EMULATE
#include "kernels.cu"

#define EMULATE(S, T)                                                                          \
    extern "C" void emu_embedding_##S(Dim3 g, unsigned b, const uint32_t* ids, const T* table, \
                                      uint32_t start, uint32_t len, int hidden, float* out) {  \
        aq_launch(g, b, [=] { embedding_##S(ids, table, start, len, hidden, out); });          \
    }                                                                                          \
    extern "C" void emu_rms_norm_##S(Dim3 g, unsigned b, float* x, const float* delta,         \
                                     const uint32_t* rows, const T* w, float eps, int dim,     \
                                     T* out) {                                                 \
        aq_launch(g, b, [=] { rms_norm_##S(x, delta, rows, w, eps, dim, out); });              \
    }                                                                                          \
    extern "C" void emu_rope_kv_write_##S(Dim3 g, unsigned b, float* qkv, const uint32_t* pos, \
                                          const float* cos_t, const float* sin_t,              \
                                          const uint32_t* slots, int heads, int kv_heads,      \
                                          int head_dim, int interleaved, int block_size,       \
                                          T* cache_k, T* cache_v) {                            \
        aq_launch(g, b, [=] {                                                                  \
            rope_kv_write_##S(qkv, pos, cos_t, sin_t, slots, heads, kv_heads, head_dim,        \
                              interleaved, block_size, cache_k, cache_v);                      \
        });                                                                                    \
    }                                                                                          \
    extern "C" void emu_attention_##S(                                                         \
        Dim3 g, unsigned b, const float* q, const T* cache_k, const T* cache_v,                \
        const uint32_t* row_seq, const uint32_t* row_pos, const uint32_t* tables,              \
        int table_stride, int heads, int kv_heads, int head_dim, int block_size,               \
        int partition, int max_splits, int q_stride, float scale, float* part_m,               \
        float* part_l, float* part_acc, T* out) {                                              \
        aq_launch(g, b, [=] {                                                                  \
            attention_##S(q, cache_k, cache_v, row_seq, row_pos, tables, table_stride, heads,  \
                          kv_heads, head_dim, block_size, partition, max_splits, q_stride,     \
                          scale, part_m, part_l, part_acc, out);                               \
        });                                                                                    \
    }                                                                                          \
    extern "C" void emu_attention_merge_##S(Dim3 g, unsigned b, const float* part_m,           \
                                            const float* part_l, const float* part_acc,        \
                                            const uint32_t* row_pos, int heads, int head_dim,  \
                                            int partition, int max_splits, T* out) {           \
        aq_launch(g, b, [=] {                                                                  \
            attention_merge_##S(part_m, part_l, part_acc, row_pos, heads, head_dim, partition, \
                                max_splits, out);                                              \
        });                                                                                    \
    }                                                                                          \
    extern "C" void emu_attention_prefill_##S(                                                 \
        Dim3 g, unsigned b, const float* q, int q_stride, const T* cache_k, const T* cache_v,  \
        const uint32_t* row_seq, const uint32_t* row_pos, const uint32_t* tables,              \
        int table_stride, const uint32_t* tiles, int heads, int kv_heads, int head_dim,        \
        int block_size, float scale, T* out) {                                                 \
        aq_launch(g, b, [=] {                                                                  \
            attention_prefill_##S(q, q_stride, cache_k, cache_v, row_seq, row_pos, tables,     \
                                  table_stride, tiles, heads, kv_heads, head_dim, block_size,  \
                                  scale, out);                                                 \
        });                                                                                    \
    }                                                                                          \
    extern "C" void emu_silu_mul_##S(Dim3 g, unsigned b, const float* gate_up, int inter,      \
                                     size_t n, T* out) {                                       \
        aq_launch(g, b, [=] { silu_mul_##S(gate_up, inter, n, out); });                        \
    }                                                                                          \
    extern "C" void emu_fill_random_##S(Dim3 g, unsigned b, T* out, size_t n, uint64_t seed,   \
                                        float center, float scale) {                           \
        aq_launch(g, b, [=] { fill_random_##S(out, n, seed, center, scale); });                \
    }

EMULATE(bf16, bf16)
EMULATE(f16, f16)

extern "C" void emu_argmax_rows(Dim3 g, unsigned b, const float* logits, int n, uint32_t* out) {
    aq_launch(g, b, [=] { argmax_rows(logits, n, out); });
}
