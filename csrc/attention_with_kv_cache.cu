// Launcher of the CUDA decoding kernels: argument checks, the split count (static shapes only),
// kernel / dtype / head-dim dispatch, launches on the current stream. Kernels: decode_mma.cuh
// (tensor cores), attention_with_kv_cache.cuh (CUDA cores), decode_common.cuh (combine).
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
#include <string>

#include "attention_with_kv_cache.cuh"
#include "decode_mma.cuh"
#include "attention_with_kv_cache.h"

namespace pytorch_mqa {
namespace {

using kv_cache::KvCacheParams;

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

int capability_major(int device) {
  static std::atomic<int> majors[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = majors[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrComputeCapabilityMajor, device));
    majors[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Shared memory one block may opt into (bytes): 227 KiB on H100, 163 KiB on A100, 99 KiB on sm_86/89.
int max_smem_optin(int device) {
  static std::atomic<int> bytes[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = bytes[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    bytes[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

size_t mma_smem_bytes(int64_t D) {
  if (D <= 64) return kv_cache::MmaConfig<64>::kSmemBytes;
  if (D <= 128) return kv_cache::MmaConfig<128>::kSmemBytes;
  return kv_cache::MmaConfig<256>::kSmemBytes;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Partials and the combine, shared by both kernels. Rows are (b, hq, t) flattened.
void launch_combine(const KvCacheParams& p, cudaStream_t stream, at::ScalarType dtype) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t blocks = ceil_div(rows, kv_cache::kCombineWarps);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "attention_with_kv_cache_cuda: too many query rows (",
              rows, ")");
  const dim3 grid(static_cast<unsigned>(blocks));
  const int threads = 32 * kv_cache::kCombineWarps;
  switch (dtype) {
    case at::kHalf:
      kv_cache::combine_splits_kernel<__half><<<grid, threads, 0, stream>>>(p);
      break;
    case at::kBFloat16:
      kv_cache::combine_splits_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(p);
      break;
    default:
      kv_cache::combine_splits_kernel<float><<<grid, threads, 0, stream>>>(p);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

dim3 split_grid(const KvCacheParams& p) {
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.heads_kv * p.row_chunks * p.num_splits;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "attention_with_kv_cache_cuda: grid too large (",
              blocks, " blocks)");
  return dim3(static_cast<unsigned>(blocks));
}

template <typename T, int D_MAX, bool EXACT_D, bool VARIANT>
void launch_simt(const KvCacheParams& p, cudaStream_t stream) {
  kv_cache::attention_with_kv_cache_simt_kernel<T, D_MAX, EXACT_D, VARIANT>
      <<<split_grid(p), kv_cache::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D_MAX, bool EXACT_D, bool VARIANT>
void launch_mma(const KvCacheParams& p, int device, cudaStream_t stream) {
  constexpr size_t smem = kv_cache::MmaConfig<D_MAX>::kSmemBytes;
  auto kernel = kv_cache::attention_with_kv_cache_mma_kernel<T, D_MAX, EXACT_D, VARIANT>;
  // Above 48 KiB of dynamic shared memory a kernel needs an opt-in, once per device.
  static std::atomic<bool> opted_in[kMaxDevices] = {};
  const int slot = device >= 0 && device < kMaxDevices ? device : 0;
  if (!opted_in[slot].load(std::memory_order_acquire)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    opted_in[slot].store(true, std::memory_order_release);
  }
  kernel<<<split_grid(p), kv_cache::kMmaThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The plain kernels have exact instantiations for D = 64 and 128; the variant kernels (window,
// softcap, ALiBi, left padding) only the general head-dim ones, to bound the build's size.
template <typename T>
void dispatch_simt(const KvCacheParams& p, bool variant, cudaStream_t stream) {
  if (variant) {
    if (p.head_dim <= 128) {
      launch_simt<T, 128, false, true>(p, stream);
    } else {
      launch_simt<T, 256, false, true>(p, stream);
    }
  } else if (p.head_dim == 64) {
    launch_simt<T, 64, true, false>(p, stream);
  } else if (p.head_dim == 128) {
    launch_simt<T, 128, true, false>(p, stream);
  } else if (p.head_dim < 128) {
    launch_simt<T, 128, false, false>(p, stream);
  } else {
    launch_simt<T, 256, false, false>(p, stream);
  }
}

template <typename T>
void dispatch_mma(const KvCacheParams& p, bool variant, int device, cudaStream_t stream) {
  if (variant) {
    if (p.head_dim <= 64) {
      launch_mma<T, 64, false, true>(p, device, stream);
    } else if (p.head_dim <= 128) {
      launch_mma<T, 128, false, true>(p, device, stream);
    } else {
      launch_mma<T, 256, false, true>(p, device, stream);
    }
  } else if (p.head_dim == 64) {
    launch_mma<T, 64, true, false>(p, device, stream);
  } else if (p.head_dim == 128) {
    launch_mma<T, 128, true, false>(p, device, stream);
  } else if (p.head_dim < 64) {
    launch_mma<T, 64, false, false>(p, device, stream);
  } else if (p.head_dim < 128) {
    launch_mma<T, 128, false, false>(p, device, stream);
  } else {
    launch_mma<T, 256, false, false>(p, device, stream);
  }
}

// An optional int32 (B,) index tensor on q's device, with values read on the device.
void check_index(const at::Tensor& t, const char* name, int64_t B, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, name, ": expected shape (", B, "), got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), name, ": expected device ", q.device(), ", got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_with_kv_cache_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const at::Tensor& cache_seqlens, bool causal, double scale, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad) {
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D tensor (B, Tq, Hq, D), got ", q.dim(), "-D");
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "q: expected dtype float16, bfloat16 or float32, got ", dtype);
  check_4d(k_cache, "k_cache", q);
  check_4d(v_cache, "v_cache", q);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2);
  const bool paged = block_table.has_value();
  TORCH_CHECK(D >= 1 && D <= 256, "q: expected head dim D in 1..256, got ", D);
  if (paged) {
    TORCH_CHECK(k_cache.size(3) == D && Hkv >= 1 && Hq % Hkv == 0 && k_cache.size(1) >= 1,
                "k_cache: expected shape (num_blocks, page_size, Hkv, ", D, ") with Hq = ", Hq,
                " a multiple of Hkv (block_table given), got ", k_cache.sizes());
    TORCH_CHECK(k_cache.size(1) % decode::kPageAlign == 0, "k_cache: expected page_size (dim 1) a multiple of ",
                decode::kPageAlign, " (block_table given), got ", k_cache.size(1));
  } else {
    const std::string slots = cache_batch_idx.has_value() ? "B_cache" : std::to_string(B);
    TORCH_CHECK((cache_batch_idx.has_value() || k_cache.size(0) == B) && k_cache.size(3) == D && Hkv >= 1 &&
                    Hq % Hkv == 0,
                "k_cache: expected shape (", slots, ", S, Hkv, ", D, ") with Hq = ", Hq, " a multiple of Hkv, got ",
                k_cache.sizes());
  }
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
  TORCH_CHECK(window_left >= -1 && window_left <= std::numeric_limits<int32_t>::max(),
              "window_left: expected -1 (unbounded) or a non-negative int32, got ", window_left);
  TORCH_CHECK(window_right >= -1 && window_right <= std::numeric_limits<int32_t>::max(),
              "window_right: expected -1 (unbounded) or a non-negative int32, got ", window_right);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "softcap: expected a finite float >= 0 (0 = off), got ",
              softcap);
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes: expected dtype float32, got ", a.scalar_type());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == Hq) || (a.dim() == 2 && a.size(0) == B && a.size(1) == Hq),
                "alibi_slopes: expected shape (", Hq, ") or (", B, ", ", Hq, "), got ", a.sizes());
    TORCH_CHECK(a.device() == q.device(), "alibi_slopes: expected device ", q.device(), ", got ", a.device());
  }
  int64_t cache_slots = k_cache.size(0);  // slots of contiguous caches, or rows of the block table
  int64_t S = k_cache.size(1);
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt, "block_table: expected dtype int32, got ", bt.scalar_type());
    const std::string rows = cache_batch_idx.has_value() ? "rows >= 1" : std::to_string(B);
    TORCH_CHECK(bt.dim() == 2 && bt.size(1) >= 1 && (cache_batch_idx.has_value() ? bt.size(0) >= 1 : bt.size(0) == B),
                "block_table: expected shape (", rows, ", max_blocks >= 1), got ", bt.sizes());
    TORCH_CHECK(bt.device() == q.device(), "block_table: expected device ", q.device(), ", got ", bt.device());
    TORCH_CHECK(bt.stride(1) == 1, "block_table: expected unit stride along max_blocks, got strides ", bt.strides());
    TORCH_CHECK(k_cache.size(0) <= std::numeric_limits<int32_t>::max(),
                "k_cache: expected at most 2**31 - 1 pages, got ", k_cache.size(0));
    cache_slots = bt.size(0);
    S = bt.size(1) * k_cache.size(1);
  }
  if (cache_batch_idx.has_value()) check_index(*cache_batch_idx, "cache_batch_idx", B, q);
  if (cache_leftpad.has_value()) check_index(*cache_leftpad, "cache_leftpad", B, q);
  TORCH_CHECK(cache_slots <= std::numeric_limits<int32_t>::max(), paged ? "block_table" : "k_cache",
              ": expected at most 2**31 - 1 cache slots, got ", cache_slots);
  TORCH_CHECK(S + Tq <= std::numeric_limits<int32_t>::max() && Hq <= std::numeric_limits<int32_t>::max(),
              "attention_with_kv_cache_cuda: S + Tq and Hq must fit in int32, got S=", S, ", Tq=", Tq, ", Hq=", Hq);

  c10::cuda::CUDAGuard device_guard(q.device());
  auto out = at::empty({B, Tq, Hq, D}, q.options());
  auto lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  if (B == 0 || Tq == 0) return {out, lse};

  const int64_t G = Hq / Hkv;
  const int64_t row_chunks = ceil_div(G * Tq, kv_cache::kRowsPerBlock);
  static_assert(kv_cache::kRowsPerBlock == kv_cache::kMmaRows, "both kernels serve 16 rows per block");

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
  p.block_table = paged ? block_table->data_ptr<int32_t>() : nullptr;
  p.bt_stride = paged ? block_table->stride(0) : 0;
  p.page_size = paged ? static_cast<int>(k_cache.size(1)) : 0;
  p.num_pages = paged ? static_cast<int>(k_cache.size(0)) : 0;
  p.cache_slots = static_cast<int>(cache_slots);
  p.cache_batch_idx = cache_batch_idx.has_value() ? cache_batch_idx->data_ptr<int32_t>() : nullptr;
  p.batch_idx_stride = cache_batch_idx.has_value() ? cache_batch_idx->stride(0) : 0;
  p.cache_leftpad = cache_leftpad.has_value() ? cache_leftpad->data_ptr<int32_t>() : nullptr;
  p.leftpad_stride = cache_leftpad.has_value() ? cache_leftpad->stride(0) : 0;
  p.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  p.alibi_stride_b = alibi_slopes.has_value() && alibi_slopes->dim() == 2 ? alibi_slopes->stride(0) : 0;
  p.alibi_stride_h = alibi_slopes.has_value() ? alibi_slopes->stride(-1) : 0;
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  p.softcap_in = softcap > 0.0 ? static_cast<float>(scale / softcap) : 0.f;
  p.softcap_out = softcap > 0.0 ? static_cast<float>(softcap * kv_cache::kLog2e) : 0.f;
  p.batch = static_cast<int>(B);
  p.seqlen_q = static_cast<int>(Tq);
  p.heads_q = static_cast<int>(Hq);
  p.heads_kv = static_cast<int>(Hkv);
  p.group = static_cast<int>(G);
  p.cache_len = static_cast<int>(S);
  p.head_dim = static_cast<int>(D);
  p.rows = static_cast<int>(G * Tq);
  p.row_chunks = static_cast<int>(row_chunks);
  p.scale_log2 = static_cast<float>(scale * kv_cache::kLog2e);
  p.causal = causal;
  p.has_new = has_new;
  const int vec = 16 / static_cast<int>(q.element_size());
  p.kv_vectorized = D % vec == 0 && rows_vectorizable(k_cache, vec) && rows_vectorizable(v_cache, vec) &&
                    (!has_new || (rows_vectorizable(*k, vec) && rows_vectorizable(*v, vec)));

  const int sms = sm_count(q.get_device());
  p.num_splits = decode::choose_splits(B * Hkv * row_chunks, S, kv_cache::kSplitAlign, sms, kv_cache::kWaves,
                                       kv_cache::kMaxSplits);
  at::Tensor o_partial, lse_partial;  // kept alive until the launches are enqueued
  if (p.num_splits > 1) {
    auto opts = q.options().dtype(at::kFloat);
    o_partial = at::empty({p.num_splits, B * Hq * Tq, D}, opts);
    lse_partial = at::empty({p.num_splits, B * Hq * Tq}, opts);
    p.o_partial = o_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  // Tensor cores for 16-bit inputs whose rows allow 16-byte cp.async, on sm_80+ devices that
  // give a block the stage ring's shared memory; the CUDA-core kernel for fp32 (a TF32 mma would
  // break the tolerance), for unaligned rows and for smaller devices.
  const int device = q.get_device();
  const bool mma = dtype != at::kFloat && p.kv_vectorized && capability_major(device) >= 8 &&
                   mma_smem_bytes(D) <= static_cast<size_t>(max_smem_optin(device));
  // The variant kernels: any of window, softcap, ALiBi or left padding.
  const bool variant = window_left >= 0 || window_right >= 0 || softcap > 0.0 || alibi_slopes.has_value() ||
                       cache_leftpad.has_value();
  switch (dtype) {
    case at::kHalf:
      mma ? dispatch_mma<__half>(p, variant, device, stream) : dispatch_simt<__half>(p, variant, stream);
      break;
    case at::kBFloat16:
      mma ? dispatch_mma<__nv_bfloat16>(p, variant, device, stream)
          : dispatch_simt<__nv_bfloat16>(p, variant, stream);
      break;
    default:
      dispatch_simt<float>(p, variant, stream);
      break;
  }
  if (p.num_splits > 1) launch_combine(p, stream, dtype);
  return {out, lse};
}

}  // namespace pytorch_mqa
