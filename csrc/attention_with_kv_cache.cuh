// Split-KV decoding attention over a preallocated KV cache, with the append of the new K/V rows
// fused into the same kernel. No torch headers: the launcher (attention_with_kv_cache.cu) fills
// `KvCacheParams` and picks the instantiation.
//
// Semantics (DESIGN §3, pytorch_mqa/reference.py::attention_with_kv_cache), per sequence b with
// L = cache_seqlens[b] read on the device:
//   * keys visible to sequence b: [0, Lk) with Lk = clamp(L + Tq_new, 0, S), Tq_new = Tq when new
//     k/v are given, else 0;
//   * key row j comes from the new k/v (row j - L) when j >= L, else from the cache; new rows are
//     written to the cache at j, and only for 0 <= j < Lk <= S, so no write can pass S or go below 0;
//   * causal: query t sees key j iff j <= t + Lk - Tq (bottom-right alignment, per sequence);
//   * a query row that sees no key gives zeros and lse = -inf.
//
// Work decomposition: one block per (batch, KV head, split, row chunk). A row is one (query
// position t, query head g of the group): the G heads of a KV head share every K/V tile the block
// loads. G * Tq rows are served 16 at a time (a decode step with G <= 16 is one row chunk). The
// key axis [0, S) is cut into `num_splits` ranges of `split_len` keys (a multiple of the tile);
// the split count depends only on static shapes, so the launch is CUDA-graph safe. With more than
// one split each block writes a partial (normalised output, lse) and `combine_splits_kernel`
// merges them with LSE weights.
//
// Per tile of BLOCK_N keys: K/V rows to shared memory (16-byte vector loads when the launcher
// found the rows aligned, element loads otherwise); scores with one thread per (key, group of
// rows), so each K chunk is converted once and used for every row it serves; an online softmax
// (one warp per row, shuffle max/sum reductions, base-2 exponentials); P @ V with each thread
// owning one 16-byte column slice of a few output rows in registers, so each V chunk is
// converted once per thread for all of them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pytorch_mqa {
namespace kv_cache {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 16;       // (query position, query head) rows served by one block
constexpr int kMaxSplits = 64;          // bound of the combine kernel's weight buffer
constexpr int kMinKeysPerSplit = 256;   // below this a split costs more than it saves
constexpr int kSmemBudget = 46 * 1024;  // static shared memory per block (the limit is 48 KiB)

struct KvCacheParams {
  const void* q;        // (B, Tq, Hq, D)
  void* k_cache;        // (B, S, Hkv, D), written at rows [L, L + Tq) ∩ [0, S)
  void* v_cache;
  const void* k_new;    // (B, Tq, Hkv, D) or nullptr
  const void* v_new;
  const int32_t* cache_seqlens;  // (B,) on the device
  void* out;            // (B, Tq, Hq, D) contiguous
  float* lse;           // (B, Hq, Tq) contiguous
  float* o_partial;     // (num_splits, B, Hq, Tq, D) when num_splits > 1
  float* lse_partial;   // (num_splits, B, Hq, Tq) when num_splits > 1

  int64_t q_stride_b, q_stride_t, q_stride_h, q_stride_d;
  int64_t kc_stride_b, kc_stride_s, kc_stride_h, kc_stride_d;
  int64_t vc_stride_b, vc_stride_s, vc_stride_h, vc_stride_d;
  int64_t kn_stride_b, kn_stride_t, kn_stride_h, kn_stride_d;
  int64_t vn_stride_b, vn_stride_t, vn_stride_h, vn_stride_d;
  int64_t seqlens_stride;

  int batch, seqlen_q, heads_q, heads_kv, group, cache_len, head_dim;
  int rows;          // group * seqlen_q
  int num_splits;
  int split_len;     // keys per split, a multiple of the tile's BLOCK_N
  float scale_log2;  // scale * log2(e): scores live in the base-2 domain
  bool causal;
  bool has_new;
  bool kv_vectorized;  // every K/V row (cache and new) is 16-byte aligned with unit last stride
};

// Tile sizes of one instantiation. q, K and V tiles are kept in the input dtype; K/V rows are
// padded by 16 bytes so that lanes reading the same chunk of consecutive rows hit distinct banks.
constexpr int block_n_for(int row_bytes) {
  int n = 64;
  while (n > 8 && kRowsPerBlock * row_bytes + 2 * n * (row_bytes + 16) + kRowsPerBlock * (n + 1) * 4 +
                          3 * kRowsPerBlock * 4 >
                      kSmemBudget) {
    n /= 2;
  }
  return n;
}

template <typename T, int D_MAX>
struct TileConfig {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kChunks = D_MAX / kVec;                   // chunks per row
  static constexpr int kRowBytes = D_MAX * static_cast<int>(sizeof(T));
  static constexpr int kBlockN = block_n_for(kRowBytes);
  static constexpr int kKvStride = D_MAX + kVec;  // elements per padded K/V row in shared memory
  // Scores: thread (key n, row group); rows rg, rg + kRowGroups, ... of the block.
  static constexpr int kRowGroups = kThreads / kBlockN;
  static constexpr int kRowsPerThread = kRowsPerBlock / kRowGroups;
  // P @ V and output: thread (chunk c, first row r0); rows r0, r0 + kRowStep, ...
  static constexpr int kRowStep = kThreads / kChunks;
  static constexpr int kItems = (kRowsPerBlock + kRowStep - 1) / kRowStep;
  static_assert(D_MAX % kVec == 0, "head dim bound must be a multiple of the vector width");
  static_assert(kThreads % kBlockN == 0 && kRowsPerBlock % kRowGroups == 0, "score mapping");
  static_assert(kThreads % kChunks == 0, "P @ V mapping");
};

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
// Main kernel. grid = (B * Hkv, num_splits, row chunks), block = kThreads.
// D_MAX is the head-dim bound of the instantiation; EXACT_D means D == D_MAX (64 and 128), so
// every head-dim loop has a compile-time trip count; otherwise D = p.head_dim <= D_MAX and the
// columns past D are zero in shared memory.
// ------------------------------------------------------------------------------------------

template <typename T, int D_MAX, bool EXACT_D>
__global__ void __launch_bounds__(kThreads)
    attention_with_kv_cache_kernel(const KvCacheParams p) {
  using Cfg = TileConfig<T, D_MAX>;
  constexpr int VEC = Cfg::kVec;
  constexpr int CHUNKS = Cfg::kChunks;
  constexpr int BLOCK_N = Cfg::kBlockN;
  constexpr int R = kRowsPerBlock;
  constexpr int KV_STRIDE = Cfg::kKvStride;
  constexpr int NRG = Cfg::kRowGroups;
  constexpr int RPT = Cfg::kRowsPerThread;
  constexpr int RSTEP = Cfg::kRowStep;
  constexpr int ITEMS = Cfg::kItems;
  constexpr int SP_STRIDE = BLOCK_N + 1;  // padding: rows of P fall in different banks

  __shared__ __align__(16) T q_s[R * D_MAX];
  __shared__ __align__(16) T k_s[BLOCK_N * KV_STRIDE];
  __shared__ __align__(16) T v_s[BLOCK_N * KV_STRIDE];
  __shared__ float sp_s[R * SP_STRIDE];  // scores, then probabilities, of the current tile
  __shared__ float m_s[R];               // running max (base 2)
  __shared__ float l_s[R];               // running sum of exponentials
  __shared__ float alpha_s[R];           // rescale factor of the current tile

  const int D = EXACT_D ? D_MAX : p.head_dim;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  const int b = blockIdx.x / p.heads_kv;
  const int h = blockIdx.x % p.heads_kv;
  const int split = blockIdx.y;
  const int row0 = blockIdx.z * R;
  const int rows = min(R, p.rows - row0);
  const int G = p.group;
  const int Tq = p.seqlen_q;

  const int64_t L = static_cast<int64_t>(p.cache_seqlens[b * p.seqlens_stride]);
  const int64_t n_new = p.has_new ? Tq : 0;
  int64_t Lk = L + n_new;
  Lk = Lk < 0 ? 0 : (Lk > p.cache_len ? p.cache_len : Lk);
  const int64_t split_begin = static_cast<int64_t>(split) * p.split_len;
  const int64_t split_end = min(split_begin + static_cast<int64_t>(p.split_len), Lk);
  // Every row chunk of a split reads the new rows from k/v; only the first writes them.
  const bool write_new = p.has_new && blockIdx.z == 0;

  const T* q = static_cast<const T*>(p.q);
  T* k_cache = static_cast<T*>(p.k_cache);
  T* v_cache = static_cast<T*>(p.v_cache);
  const T* k_new = static_cast<const T*>(p.k_new);
  const T* v_new = static_cast<const T*>(p.v_new);

  // q rows of this block -> shared memory (zero past D and past the last row).
  for (int i = tid; i < R * D_MAX; i += kThreads) {
    const int r = i / D_MAX;
    const int d = i % D_MAX;
    T val = from_float<T>(0.f);
    if (r < rows && d < D) {
      const int gr = row0 + r;
      const int t = gr / G;
      const int hq = h * G + gr % G;
      val = q[b * p.q_stride_b + t * p.q_stride_t + hq * p.q_stride_h + d * p.q_stride_d];
    }
    q_s[i] = val;
  }
  if (tid < R) {
    m_s[tid] = neg_inf();
    l_s[tid] = 0.f;
  }

  float acc[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[it][e] = 0.f;
  }
  __syncthreads();

  for (int64_t tile = split_begin; tile < split_end; tile += BLOCK_N) {
    const int n_valid = static_cast<int>(min(static_cast<int64_t>(BLOCK_N), split_end - tile));

    // ---- K/V tile -> shared memory; new rows come from k/v and are written to the cache.
    if (p.kv_vectorized) {
      for (int i = tid; i < BLOCK_N * CHUNKS; i += kThreads) {
        const int n = i / CHUNKS;
        const int c = i % CHUNKS;
        uint4 kv = make_uint4(0u, 0u, 0u, 0u);
        uint4 vv = kv;
        if (n < n_valid && (EXACT_D || c * VEC < D)) {
          const int64_t j = tile + n;  // 0 <= j < Lk <= S
          const int64_t d0 = static_cast<int64_t>(c) * VEC;
          const int64_t kc_off = b * p.kc_stride_b + j * p.kc_stride_s + h * p.kc_stride_h + d0;
          const int64_t vc_off = b * p.vc_stride_b + j * p.vc_stride_s + h * p.vc_stride_h + d0;
          if (p.has_new && j >= L) {  // a new row: 0 <= j - L < Tq because j < Lk <= L + Tq
            const int64_t t = j - L;
            kv = *reinterpret_cast<const uint4*>(
                k_new + b * p.kn_stride_b + t * p.kn_stride_t + h * p.kn_stride_h + d0);
            vv = *reinterpret_cast<const uint4*>(
                v_new + b * p.vn_stride_b + t * p.vn_stride_t + h * p.vn_stride_h + d0);
            if (write_new) {
              *reinterpret_cast<uint4*>(k_cache + kc_off) = kv;
              *reinterpret_cast<uint4*>(v_cache + vc_off) = vv;
            }
          } else {
            kv = *reinterpret_cast<const uint4*>(k_cache + kc_off);
            vv = *reinterpret_cast<const uint4*>(v_cache + vc_off);
          }
        }
        *reinterpret_cast<uint4*>(&k_s[n * KV_STRIDE + c * VEC]) = kv;
        *reinterpret_cast<uint4*>(&v_s[n * KV_STRIDE + c * VEC]) = vv;
      }
    } else {
      for (int i = tid; i < BLOCK_N * D_MAX; i += kThreads) {
        const int n = i / D_MAX;
        const int d = i % D_MAX;
        T kv = from_float<T>(0.f);
        T vv = kv;
        if (n < n_valid && d < D) {
          const int64_t j = tile + n;
          const int64_t kc_off = b * p.kc_stride_b + j * p.kc_stride_s + h * p.kc_stride_h + d * p.kc_stride_d;
          const int64_t vc_off = b * p.vc_stride_b + j * p.vc_stride_s + h * p.vc_stride_h + d * p.vc_stride_d;
          if (p.has_new && j >= L) {
            const int64_t t = j - L;
            kv = k_new[b * p.kn_stride_b + t * p.kn_stride_t + h * p.kn_stride_h + d * p.kn_stride_d];
            vv = v_new[b * p.vn_stride_b + t * p.vn_stride_t + h * p.vn_stride_h + d * p.vn_stride_d];
            if (write_new) {
              k_cache[kc_off] = kv;
              v_cache[vc_off] = vv;
            }
          } else {
            kv = k_cache[kc_off];
            vv = v_cache[vc_off];
          }
        }
        k_s[n * KV_STRIDE + d] = kv;
        v_s[n * KV_STRIDE + d] = vv;
      }
    }
    __syncthreads();

    // ---- scores: thread (key n, row group rg) takes rows rg, rg + NRG, ...; each K chunk is
    // converted once, q chunks are shared-memory broadcasts within a warp.
    {
      const int n = tid % BLOCK_N;
      const int rg = tid / BLOCK_N;
      float dots[RPT];
#pragma unroll
      for (int k = 0; k < RPT; ++k) dots[k] = 0.f;
      if (n < n_valid) {
#pragma unroll 2
        for (int c = 0; c < CHUNKS; ++c) {
          if (!EXACT_D && c * VEC >= D) break;
          float kf[VEC];
          unpack<T>(*reinterpret_cast<const uint4*>(&k_s[n * KV_STRIDE + c * VEC]), kf);
#pragma unroll
          for (int k = 0; k < RPT; ++k) {
            const int r = rg + k * NRG;
            if (r < rows) {
              float qf[VEC];
              unpack<T>(*reinterpret_cast<const uint4*>(&q_s[r * D_MAX + c * VEC]), qf);
#pragma unroll
              for (int e = 0; e < VEC; ++e) dots[k] = fmaf(qf[e], kf[e], dots[k]);
            }
          }
        }
      }
      const int64_t j = tile + n;
#pragma unroll
      for (int k = 0; k < RPT; ++k) {
        const int r = rg + k * NRG;
        if (r < rows) {
          const int t = (row0 + r) / G;
          const bool visible = n < n_valid && (!p.causal || j <= t + Lk - Tq);
          sp_s[r * SP_STRIDE + n] = visible ? dots[k] * p.scale_log2 : neg_inf();
        }
      }
    }
    __syncthreads();

    // ---- online softmax: one warp per row; scores are replaced by probabilities in place.
    for (int r = warp; r < rows; r += kWarps) {
      float m_tile = neg_inf();
      for (int n = lane; n < BLOCK_N; n += 32) m_tile = fmaxf(m_tile, sp_s[r * SP_STRIDE + n]);
      m_tile = warp_max(m_tile);
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, m_tile);
      // No visible key yet: subtract 0 instead of -inf so exp2 gives 0, never NaN.
      const float m_use = m_new == neg_inf() ? 0.f : m_new;
      float sum = 0.f;
      for (int n = lane; n < BLOCK_N; n += 32) {
        const float e = exp2f(sp_s[r * SP_STRIDE + n] - m_use);
        sp_s[r * SP_STRIDE + n] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
        alpha_s[r] = alpha;
      }
    }
    __syncthreads();

    // ---- acc = acc * alpha + P @ V: thread (chunk c, row r0) owns rows r0, r0 + RSTEP, ...
    {
      const int c = tid % CHUNKS;
      const int r0 = tid / CHUNKS;
      if (EXACT_D || c * VEC < D) {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
          const int r = r0 + it * RSTEP;
          if (r < rows) {
            const float alpha = alpha_s[r];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[it][e] *= alpha;
          }
        }
#pragma unroll 2
        for (int n = 0; n < n_valid; ++n) {
          float vf[VEC];
          unpack<T>(*reinterpret_cast<const uint4*>(&v_s[n * KV_STRIDE + c * VEC]), vf);
#pragma unroll
          for (int it = 0; it < ITEMS; ++it) {
            const int r = r0 + it * RSTEP;
            if (r < rows) {
              const float pr = sp_s[r * SP_STRIDE + n];
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[it][e] = fmaf(pr, vf[e], acc[it][e]);
            }
          }
        }
      }
    }
    __syncthreads();  // the next tile overwrites k_s, v_s and sp_s
  }

  // ---- epilogue: normalised output and lse, final (one split) or partial (several).
  const int64_t lse_rows = static_cast<int64_t>(p.batch) * p.heads_q * Tq;  // per split
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int r = tid / CHUNKS + it * RSTEP;
    const int c = tid % CHUNKS;
    if (r < rows && (EXACT_D || c * VEC < D)) {
      const float l = l_s[r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int gr = row0 + r;
      const int t = gr / G;
      const int hq = h * G + gr % G;
      if (p.num_splits == 1) {
        T* out = static_cast<T*>(p.out) +
                 ((static_cast<int64_t>(b) * Tq + t) * p.heads_q + hq) * static_cast<int64_t>(D);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int d = c * VEC + e;
          if (EXACT_D || d < D) out[d] = from_float<T>(acc[it][e] * inv);
        }
      } else {
        const int64_t lse_row = (static_cast<int64_t>(b) * p.heads_q + hq) * Tq + t;
        float* out = p.o_partial + (split * lse_rows + lse_row) * static_cast<int64_t>(D);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int d = c * VEC + e;
          if (EXACT_D || d < D) out[d] = acc[it][e] * inv;
        }
      }
    }
  }
  if (tid < rows) {
    const int r = tid;
    const float l = l_s[r];
    // lse in natural log: m and log2(l) are base 2.
    const float lse = l > 0.f ? (m_s[r] + log2f(l)) * 0.69314718055994531f : neg_inf();
    const int gr = row0 + r;
    const int t = gr / G;
    const int hq = h * G + gr % G;
    const int64_t lse_row = (static_cast<int64_t>(b) * p.heads_q + hq) * Tq + t;
    if (p.num_splits == 1) {
      p.lse[lse_row] = lse;
    } else {
      p.lse_partial[split * lse_rows + lse_row] = lse;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Combine kernel: one warp per (b, hq, t) row merges the splits' partial outputs with weights
// exp(lse_s - max_s lse_s). grid = ceil(B * Hq * Tq / kWarps), block = kThreads.
// ------------------------------------------------------------------------------------------

struct CombineParams {
  const float* o_partial;    // (num_splits, B, Hq, Tq, D)
  const float* lse_partial;  // (num_splits, B, Hq, Tq)
  void* out;                 // (B, Tq, Hq, D) contiguous
  float* lse;                // (B, Hq, Tq) contiguous
  int batch, seqlen_q, heads_q, head_dim, num_splits;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const CombineParams p) {
  __shared__ float w_s[kWarps][kMaxSplits];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t n_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (b, hq, t) flattened
  if (row >= n_rows) return;  // whole warp; no block-level barrier follows
  const int ns = p.num_splits;

  float m = neg_inf();
  for (int s = lane; s < ns; s += 32) m = fmaxf(m, p.lse_partial[s * n_rows + row]);
  m = warp_max(m);
  float sum = 0.f;
  for (int s = lane; s < ns; s += 32) {
    // A split that saw no key has lse = -inf and weight 0; if none saw a key, all weights are 0.
    const float w = m == neg_inf() ? 0.f : expf(p.lse_partial[s * n_rows + row] - m);
    w_s[warp][s] = w;
    sum += w;
  }
  sum = warp_sum(sum);
  __syncwarp();

  const int t = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int hq = static_cast<int>(bh % p.heads_q);
  const int64_t b = bh / p.heads_q;
  if (lane == 0) p.lse[row] = sum > 0.f ? m + logf(sum) : neg_inf();
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* out = static_cast<T*>(p.out) + ((b * p.seqlen_q + t) * p.heads_q + hq) * static_cast<int64_t>(p.head_dim);
  for (int d = lane; d < p.head_dim; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < ns; ++s) {
      acc = fmaf(w_s[warp][s], p.o_partial[(s * n_rows + row) * p.head_dim + d], acc);
    }
    out[d] = from_float<T>(acc * inv);
  }
}

}  // namespace kv_cache
}  // namespace pytorch_mqa
