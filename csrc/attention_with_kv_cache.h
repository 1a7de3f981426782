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
std::tuple<at::Tensor, at::Tensor> attention_with_kv_cache_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const at::Tensor& cache_seqlens, bool causal, double scale);

}  // namespace pytorch_mqa
