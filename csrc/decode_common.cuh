// Shared by the CUDA decoding kernels (attention_with_kv_cache.cuh: CUDA cores; decode_mma.cuh:
// tensor cores): the parameter block, the per-sequence work, dtype helpers, warp reductions and the
// split combine. No torch headers: the launcher (attention_with_kv_cache.cu) fills `KvCacheParams`.
//
// Semantics (DESIGN §3, pytorch_mqa/reference.py::attention_with_kv_cache), per sequence b with
// L = cache_seqlens[b] read on the device:
//   * keys visible to sequence b: [lo, Lk) with Lk = clamp(L + Tq_new, 0, S), Tq_new = Tq when new
//     k/v are given, else 0, and lo = cache_leftpad[b] (0 without it);
//   * key row j comes from the new k/v (row j - L) when j >= L, else from the cache; new rows are
//     written to the cache at j, and only for 0 <= j < Lk <= S, so no write can pass S or go below 0;
//   * causal: query t sees key j iff j <= t + Lk - Tq (bottom-right alignment, per sequence); a
//     window (left, right) also needs t + Lk - Tq - left <= j <= t + Lk - Tq + right; softcap
//     and ALiBi transform the score (decode_index.h variant_score). With left padding these are the
//     alignment on j - lo with Lk - lo keys, FlashAttention's rule;
//   * cache row j of sequence b: k_cache[slot, j] with slot = cache_batch_idx[b] (else b), or, with
//     a block table, k_cache[table[slot, j / page_size], j % page_size];
//   * a query row that sees no key gives zeros and lse = -inf.
//
// Work split (decode_index.h): one block per (batch * KV head, row chunk, split), folded into
// grid axis 0. The splits cut each sequence's work span [begin, Lk) into num_splits equal slices
// (a multiple of kSplitAlign keys); begin is the first key any query can see (the padding, or the
// window's start), rounded down to kSplitAlign, so the work scales with the window. The split count
// depends only on static shapes and the SM count, so the launch is CUDA-graph safe. Blocks of
// splits past the span exit at once and write nothing; `combine_splits_kernel` merges the active
// splits' partials.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "decode_index.h"

namespace pytorch_mqa {
namespace kv_cache {

constexpr int kSplitAlign = 64;     // keys per split are a multiple of this (a tile of both kernels)
constexpr int kMaxSplits = 1024;    // bound of the split count (partials: num_splits x rows x D fp32)
constexpr int kWaves = 2;           // blocks wanted per SM
constexpr float kLn2 = 0.69314718055994531f;   // ln(2): base-2 LSE -> natural log
constexpr double kLog2e = 1.4426950408889634;  // log2(e): scores in the base-2 domain

struct KvCacheParams {
  const void* q;        // (B, Tq, Hq, D)
  void* k_cache;        // (B_cache, S, Hkv, D), or (num_pages, page_size, Hkv, D) with a block table
  void* v_cache;
  const void* k_new;    // (B, Tq, Hkv, D) or nullptr
  const void* v_new;
  const int32_t* cache_seqlens;  // (B,) on the device
  const int32_t* block_table;    // (rows, max_blocks) or nullptr: paged caches
  const int32_t* cache_batch_idx;  // (B,) or nullptr: sequence b uses cache slot / table row b
  const int32_t* cache_leftpad;  // (B,) or nullptr: valid rows of sequence b start there
  const float* alibi_slopes;     // (Hq,) or (B, Hq) or nullptr
  void* out;            // (B, Tq, Hq, D) contiguous
  float* lse;           // (B, Hq, Tq) contiguous
  float* o_partial;     // (num_splits, B, Hq, Tq, D) when num_splits > 1
  float* lse_partial;   // (num_splits, B, Hq, Tq) when num_splits > 1

  int64_t q_stride_b, q_stride_t, q_stride_h, q_stride_d;
  int64_t kc_stride_b, kc_stride_s, kc_stride_h, kc_stride_d;  // paged: b = page, s = row in page
  int64_t vc_stride_b, vc_stride_s, vc_stride_h, vc_stride_d;
  int64_t kn_stride_b, kn_stride_t, kn_stride_h, kn_stride_d;
  int64_t vn_stride_b, vn_stride_t, vn_stride_h, vn_stride_d;
  int64_t seqlens_stride, bt_stride, batch_idx_stride, leftpad_stride, alibi_stride_b, alibi_stride_h;

  int batch, seqlen_q, heads_q, heads_kv, group, cache_len, head_dim;
  int cache_slots;   // cache_batch_idx values must lie in [0, cache_slots) (B_cache or table rows)
  int page_size;     // paged: rows per page (a multiple of decode::kPageAlign)
  int num_pages;     // paged: pages in k_cache / v_cache; table entries outside [0, num_pages) are skipped
  int rows;          // group * seqlen_q
  int row_chunks;    // blocks per (batch, KV head) and split
  int num_splits;    // slices of the live keys
  float scale_log2;  // scale * log2(e): scores live in the base-2 domain
  int window_left, window_right;  // -1: unbounded
  float softcap_in, softcap_out;  // softcap > 0: scale / softcap and softcap * log2(e); else 0
  bool causal;
  bool has_new;
  bool kv_vectorized;  // every K/V row (cache and new) is 16-byte aligned with unit last stride
};

// Sequence b's keys (decode_index.h seq_span) and cache slot. A slot (cache_batch_idx value)
// outside [0, cache_slots) makes the sequence empty: it reads and writes nothing.
struct SeqWork {
  int64_t L, Lk, L_cache;  // device length, live keys, first key taken from the new rows
  int64_t lo, begin;       // first valid key, first key of the work span
  int64_t slot;            // cache slot (contiguous) or block-table row (paged)
};

__device__ __forceinline__ SeqWork seq_work(const KvCacheParams& p, int b) {
  SeqWork s;
  s.L = static_cast<int64_t>(p.cache_seqlens[b * p.seqlens_stride]);
  s.slot = p.cache_batch_idx ? static_cast<int64_t>(p.cache_batch_idx[b * p.batch_idx_stride]) : b;
  const int64_t pad = p.cache_leftpad ? static_cast<int64_t>(p.cache_leftpad[b * p.leftpad_stride]) : 0;
  const decode::SeqSpan sp =
      decode::seq_span(s.L, p.has_new ? p.seqlen_q : 0, p.cache_len, pad, p.window_left, p.seqlen_q, kSplitAlign);
  s.Lk = sp.Lk;
  s.lo = sp.lo;
  s.begin = sp.begin;
  s.L_cache = p.has_new ? decode::live_keys(s.L, 0, p.cache_len) : s.Lk;
  if (s.slot < 0 || s.slot >= p.cache_slots) {
    s.slot = 0;
    s.Lk = s.lo = s.begin = s.L_cache = 0;
  }
  return s;
}

// Where block blockIdx.x works: its sequence, KV head, row chunk and key range.
struct BlockWork {
  int b, hk, chunk, split;
  SeqWork s;
  decode::KeyRange keys;  // this split's slice of the work span [s.begin, s.Lk)
  bool active;            // split < active splits of this sequence
};

__device__ __forceinline__ BlockWork block_work(const KvCacheParams& p) {
  BlockWork w;
  const decode::BlockIndex bi = decode::block_index(blockIdx.x, p.row_chunks, p.num_splits);
  w.b = static_cast<int>(bi.bh / p.heads_kv);
  w.hk = static_cast<int>(bi.bh % p.heads_kv);
  w.chunk = bi.chunk;
  w.split = bi.split;
  w.s = seq_work(p, w.b);
  w.active = w.split < decode::active_splits(w.s.Lk - w.s.begin, p.num_splits, kSplitAlign);
  w.keys = decode::split_range(w.split, w.s.begin, w.s.Lk, p.num_splits, kSplitAlign);
  return w;
}

// Offset of cache row j of a sequence (without the head / dim part): contiguous caches use the
// slot, paged caches the sequence's block-table row `table`. -1: a page outside the cache.
__device__ __forceinline__ int64_t cache_row_offset(const KvCacheParams& p, const int32_t* table, int64_t slot,
                                                    int64_t j, int64_t stride_b, int64_t stride_s) {
  if (table == nullptr) return slot * stride_b + j * stride_s;
  const decode::PageSlot ps = decode::page_slot(j, p.page_size);
  const int64_t page = table[ps.page_index];
  return page < 0 || page >= p.num_pages ? -1 : page * stride_b + ps.row * stride_s;
}

// ------------------------------------------------------------------------------------------
// dtype helpers (no operators on __half/__nv_bfloat16: torch builds with __CUDA_NO_HALF_OPERATORS__)
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A 16-byte chunk of T as floats (4 for float, 8 for half types).
template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, float* f);

template <>
__device__ __forceinline__ void unpack<float>(const uint4& u, float* f) {
  f[0] = __uint_as_float(u.x);
  f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z);
  f[3] = __uint_as_float(u.w);
}

template <>
__device__ __forceinline__ void unpack<__half>(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// ------------------------------------------------------------------------------------------
// Combine kernel: one warp per (b, hq, t) row merges the active splits' partial outputs with
// weights exp(lse_s - max_s lse_s); the active split count comes from cache_seqlens, as in the
// split kernel. grid = ceil(B * Hq * Tq / 4), block = 128.
// ------------------------------------------------------------------------------------------

constexpr int kCombineWarps = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kCombineWarps) combine_splits_kernel(const KvCacheParams p) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;  // (b, hq, t) flattened
  if (row >= n_rows) return;  // whole warp; no block-level barrier follows
  const int t = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int hq = static_cast<int>(bh % p.heads_q);
  const int64_t b = bh / p.heads_q;
  const SeqWork sw = seq_work(p, static_cast<int>(b));
  const int ns = decode::active_splits(sw.Lk - sw.begin, p.num_splits, kSplitAlign);

  float m = neg_inf();
  for (int s = lane; s < ns; s += 32) m = fmaxf(m, p.lse_partial[s * n_rows + row]);
  m = warp_max(m);
  float sum = 0.f;
  for (int s = lane; s < ns; s += 32) {
    // A split that saw no key has lse = -inf and weight 0; if none saw a key, all weights are 0.
    sum += m == neg_inf() ? 0.f : expf(p.lse_partial[s * n_rows + row] - m);
  }
  sum = warp_sum(sum);
  if (lane == 0) p.lse[row] = sum > 0.f ? m + logf(sum) : neg_inf();
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* out = static_cast<T*>(p.out) + ((b * p.seqlen_q + t) * p.heads_q + hq) * static_cast<int64_t>(p.head_dim);
  for (int d = lane; d < p.head_dim; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < ns; ++s) {
      const float w = m == neg_inf() ? 0.f : expf(p.lse_partial[s * n_rows + row] - m);
      acc = fmaf(w, p.o_partial[(s * n_rows + row) * p.head_dim + d], acc);
    }
    out[d] = from_float<T>(acc * inv);
  }
}

}  // namespace kv_cache
}  // namespace pytorch_mqa
