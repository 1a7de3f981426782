// Host entry point of the CUDA decoding kernel (defined in attention_with_kv_cache.cu,
// registered in bindings.cpp as pytorch_mqa::attention_with_kv_cache_cuda).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace pytorch_mqa {

// q (B, Tq, Hq, D); k_cache, v_cache (B, S, Hkv, D), written in place at rows
// [cache_seqlens[b], cache_seqlens[b] + Tq) ∩ [0, S) when k, v (B, Tq, Hkv, D) are given;
// cache_seqlens int32 (B,) on q's device. Returns out (B, Tq, Hq, D) and lse (B, Hq, Tq) float32.
// DESIGN §3's features (FlashAttention's semantics): window_left / window_right (-1 unbounded),
// softcap (0 off), alibi_slopes (Hq,) or (B, Hq) float32; block_table (B, max_blocks) int32 with
// caches (num_blocks, page_size, Hkv, D), S = max_blocks * page_size; cache_batch_idx (B,) int32
// (the cache slot, or the block-table row, of sequence b); cache_leftpad (B,) int32 (valid rows
// start there; causal / window / ALiBi align on j - leftpad). Index values are read on the device:
// a slot outside the cache makes the sequence empty, a page outside the cache reads as zeros and
// is never written.
std::tuple<at::Tensor, at::Tensor> attention_with_kv_cache_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const at::Tensor& cache_seqlens, bool causal, double scale, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad);

}  // namespace pytorch_mqa
