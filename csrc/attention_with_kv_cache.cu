// Launcher of the CUDA decoding kernel: argument checks, the split count (static shapes only),
// dtype / head-dim dispatch, launches on the current stream. Kernels: attention_with_kv_cache.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention_with_kv_cache.cuh"
#include "attention_with_kv_cache.h"

namespace pytorch_mqa {
namespace {

using kv_cache::KvCacheParams;
using kv_cache::TileConfig;

constexpr int kMaxDevices = 64;

int sm_count(int device) {
  static std::atomic<int> counts[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits of the key axis [0, S): from B, Hkv, S, the row chunks and the SM count only, never from
// the device lengths, so a captured CUDA graph stays valid for any cache_seqlens.
void choose_splits(int64_t blocks, int64_t S, int block_n, int sms, int* num_splits, int* split_len) {
  int64_t splits = 1;
  if (S > block_n && blocks < sms) {
    splits = ceil_div(2 * static_cast<int64_t>(sms), blocks);  // about two blocks per SM
    splits = std::min(splits, ceil_div(S, kv_cache::kMinKeysPerSplit));
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, kv_cache::kMaxSplits));
  }
  int64_t len = ceil_div(std::max<int64_t>(S, 1), splits);
  len = ceil_div(len, block_n) * block_n;
  *split_len = static_cast<int>(len);
  *num_splits = static_cast<int>(std::max<int64_t>(1, ceil_div(S, len)));
}

// 16-byte vector access of K/V rows needs unit last stride, every other stride a multiple of the
// vector width and a 16-byte aligned base.
bool rows_vectorizable(const at::Tensor& t, int vec) {
  return t.stride(3) == 1 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
         t.stride(2) % vec == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_4d(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), name, ": expected device ", q.device(), " (the device of q), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
              " (the dtype of q), got ", t.scalar_type());
}

template <typename T, int D_MAX, bool EXACT_D>
void launch(KvCacheParams& p, int64_t row_chunks, int sms, const at::Tensor& q, cudaStream_t stream,
            at::Tensor& o_partial, at::Tensor& lse_partial) {
  using Cfg = TileConfig<T, D_MAX>;
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.heads_kv;
  choose_splits(blocks * row_chunks, p.cache_len, Cfg::kBlockN, sms, &p.num_splits, &p.split_len);
  if (p.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
    auto opts = q.options().dtype(at::kFloat);
    o_partial = at::empty({p.num_splits, rows, p.head_dim}, opts);
    lse_partial = at::empty({p.num_splits, rows}, opts);
    p.o_partial = o_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(row_chunks));
  kv_cache::attention_with_kv_cache_kernel<T, D_MAX, EXACT_D><<<grid, kv_cache::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    kv_cache::CombineParams c;
    c.o_partial = p.o_partial;
    c.lse_partial = p.lse_partial;
    c.out = p.out;
    c.lse = p.lse;
    c.batch = p.batch;
    c.seqlen_q = p.seqlen_q;
    c.heads_q = p.heads_q;
    c.head_dim = p.head_dim;
    c.num_splits = p.num_splits;
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
    const int64_t combine_blocks = ceil_div(rows, kv_cache::kWarps);
    TORCH_CHECK(combine_blocks <= std::numeric_limits<int32_t>::max(),
                "attention_with_kv_cache_cuda: too many query rows (", rows, ")");
    kv_cache::combine_splits_kernel<T><<<static_cast<unsigned>(combine_blocks), kv_cache::kThreads, 0, stream>>>(c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void dispatch_head_dim(KvCacheParams& p, int64_t row_chunks, int sms, const at::Tensor& q, cudaStream_t stream,
                       at::Tensor& o_partial, at::Tensor& lse_partial) {
  if (p.head_dim == 64) {
    launch<T, 64, true>(p, row_chunks, sms, q, stream, o_partial, lse_partial);
  } else if (p.head_dim == 128) {
    launch<T, 128, true>(p, row_chunks, sms, q, stream, o_partial, lse_partial);
  } else if (p.head_dim < 128) {
    launch<T, 128, false>(p, row_chunks, sms, q, stream, o_partial, lse_partial);
  } else {
    launch<T, 256, false>(p, row_chunks, sms, q, stream, o_partial, lse_partial);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_with_kv_cache_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const at::Tensor& cache_seqlens, bool causal, double scale) {
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D tensor (B, Tq, Hq, D), got ", q.dim(), "-D");
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "q: expected dtype float16, bfloat16 or float32, got ", dtype);
  check_4d(k_cache, "k_cache", q);
  check_4d(v_cache, "v_cache", q);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t S = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(D >= 1 && D <= 256, "q: expected head dim D in 1..256, got ", D);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && Hkv >= 1 && Hq % Hkv == 0,
              "k_cache: expected shape (", B, ", S, Hkv, ", D, ") with Hq = ", Hq,
              " a multiple of Hkv, got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: expected shape ", k_cache.sizes(),
              " (the shape of k_cache), got ", v_cache.sizes());
  TORCH_CHECK(k.has_value() == v.has_value(), "k, v: expected both or neither");
  const bool has_new = k.has_value();
  if (has_new) {
    check_4d(*k, "k", q);
    check_4d(*v, "v", q);
    const std::vector<int64_t> want = {B, Tq, Hkv, D};
    TORCH_CHECK(k->sizes() == at::IntArrayRef(want), "k: expected shape ", at::IntArrayRef(want), ", got ",
                k->sizes());
    TORCH_CHECK(v->sizes() == at::IntArrayRef(want), "v: expected shape ", at::IntArrayRef(want), ", got ",
                v->sizes());
  }
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens: expected dtype int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens: expected shape (", B,
              "), got ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.device() == q.device(), "cache_seqlens: expected device ", q.device(), ", got ",
              cache_seqlens.device());
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite float, got ", scale);
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max() && Tq <= std::numeric_limits<int32_t>::max() &&
                  Hq <= std::numeric_limits<int32_t>::max(),
              "attention_with_kv_cache_cuda: S, Tq and Hq must fit in int32, got S=", S, ", Tq=", Tq, ", Hq=", Hq);

  c10::cuda::CUDAGuard device_guard(q.device());
  auto out = at::empty({B, Tq, Hq, D}, q.options());
  auto lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  if (B == 0 || Tq == 0) return {out, lse};

  const int64_t G = Hq / Hkv;
  const int64_t row_chunks = ceil_div(G * Tq, kv_cache::kRowsPerBlock);
  TORCH_CHECK(B * Hkv <= std::numeric_limits<int32_t>::max() && row_chunks <= 65535,
              "attention_with_kv_cache_cuda: grid too large (B * Hkv = ", B * Hkv, ", row chunks = ", row_chunks,
              ")");

  KvCacheParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_new = has_new ? k->data_ptr() : nullptr;
  p.v_new = has_new ? v->data_ptr() : nullptr;
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_partial = nullptr;
  p.lse_partial = nullptr;
  p.q_stride_b = q.stride(0);
  p.q_stride_t = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.q_stride_d = q.stride(3);
  p.kc_stride_b = k_cache.stride(0);
  p.kc_stride_s = k_cache.stride(1);
  p.kc_stride_h = k_cache.stride(2);
  p.kc_stride_d = k_cache.stride(3);
  p.vc_stride_b = v_cache.stride(0);
  p.vc_stride_s = v_cache.stride(1);
  p.vc_stride_h = v_cache.stride(2);
  p.vc_stride_d = v_cache.stride(3);
  if (has_new) {
    p.kn_stride_b = k->stride(0);
    p.kn_stride_t = k->stride(1);
    p.kn_stride_h = k->stride(2);
    p.kn_stride_d = k->stride(3);
    p.vn_stride_b = v->stride(0);
    p.vn_stride_t = v->stride(1);
    p.vn_stride_h = v->stride(2);
    p.vn_stride_d = v->stride(3);
  }
  p.seqlens_stride = cache_seqlens.stride(0);
  p.batch = static_cast<int>(B);
  p.seqlen_q = static_cast<int>(Tq);
  p.heads_q = static_cast<int>(Hq);
  p.heads_kv = static_cast<int>(Hkv);
  p.group = static_cast<int>(G);
  p.cache_len = static_cast<int>(S);
  p.head_dim = static_cast<int>(D);
  p.rows = static_cast<int>(G * Tq);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
  p.has_new = has_new;
  const int vec = 16 / static_cast<int>(q.element_size());
  p.kv_vectorized = D % vec == 0 && rows_vectorizable(k_cache, vec) && rows_vectorizable(v_cache, vec) &&
                    (!has_new || (rows_vectorizable(*k, vec) && rows_vectorizable(*v, vec)));

  const int sms = sm_count(q.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  at::Tensor o_partial, lse_partial;  // kept alive until the launches are enqueued
  switch (dtype) {
    case at::kHalf:
      dispatch_head_dim<__half>(p, row_chunks, sms, q, stream, o_partial, lse_partial);
      break;
    case at::kBFloat16:
      dispatch_head_dim<__nv_bfloat16>(p, row_chunks, sms, q, stream, o_partial, lse_partial);
      break;
    default:
      dispatch_head_dim<float>(p, row_chunks, sms, q, stream, o_partial, lse_partial);
      break;
  }
  return {out, lse};
}

}  // namespace pytorch_mqa
