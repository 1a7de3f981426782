// Split-KV decoding attention on CUDA cores, with the append of the new K/V rows fused into the
// same kernel. The tensor-core kernel (decode_mma.cuh) serves fp16 / bf16 with 16-byte aligned
// rows on sm_80+; this one serves the rest: fp32 inputs (a TF32 mma would break the DESIGN §5
// tolerance, and no 3xTF32 path exists yet), rows that are not 16-byte aligned or whose head dim
// is not a multiple of 8, and devices below sm_80. Semantics and work split: decode_common.cuh.
//
// Per tile of BLOCK_N keys: K/V rows to shared memory (16-byte vector loads when the launcher
// found the rows aligned, element loads otherwise); scores with one thread per (key, group of
// rows), so each K chunk is converted once and used for every row it serves; an online softmax
// (one warp per row, shuffle max/sum reductions, base-2 exponentials); P @ V with each thread
// owning one 16-byte column slice of a few output rows in registers.
#pragma once

#include "decode_common.cuh"

namespace pytorch_mqa {
namespace kv_cache {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 16;       // (query position, query head) rows served by one block
constexpr int kSmemBudget = 46 * 1024;  // static shared memory per block (the limit is 48 KiB)

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
// CUDA-core kernel. grid = B * Hkv * row_chunks * num_splits (decode_index.h), block = kThreads.
// D_MAX is the head-dim bound of the instantiation; EXACT_D means D == D_MAX (64 and 128), so
// every head-dim loop has a compile-time trip count; otherwise D = p.head_dim <= D_MAX and the
// columns past D are zero in shared memory.
// ------------------------------------------------------------------------------------------

// VARIANT: window, softcap, ALiBi and left padding (per-row key bounds, the score transform), as in
// decode_mma.cuh. Paged caches and cache_batch_idx are runtime branches, uniform per block.
template <typename T, int D_MAX, bool EXACT_D, bool VARIANT>
__global__ void __launch_bounds__(kThreads, 3)  // 3 blocks per SM: ptxas keeps fp32 D = 256 spill-free
    attention_with_kv_cache_simt_kernel(const KvCacheParams p) {
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
  __shared__ int64_t krow_s[BLOCK_N];    // paged: offset of each key row of the tile (-1: no page)
  __shared__ int64_t vrow_s[BLOCK_N];

  const int D = EXACT_D ? D_MAX : p.head_dim;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  const BlockWork w = block_work(p);
  if (!w.active) return;  // a split past the live keys: nothing to read or write (whole block)
  const int b = w.b;
  const int h = w.hk;
  const int split = w.split;
  const int row0 = w.chunk * R;
  const int rows = min(R, p.rows - row0);
  const int G = p.group;
  const int Tq = p.seqlen_q;
  const int64_t L = w.s.L;
  const int64_t Lk = w.s.Lk;
  const int64_t split_begin = w.keys.begin;
  const int64_t split_end = w.keys.end;
  // Paged: the sequence's block-table row; contiguous: its cache slot (b, or cache_batch_idx[b]).
  const int32_t* table = p.block_table ? p.block_table + w.s.slot * p.bt_stride : nullptr;
  const int64_t slot = w.s.slot;
  // Keys this block reads: the split; with VARIANT narrowed to what its rows can see.
  int64_t tiles_begin = split_begin, tiles_end = split_end;
  if (VARIANT) {
    const decode::KeyRange ck = decode::chunk_keys(w.keys, row0 / G, (row0 + rows - 1) / G, Lk, Tq, w.s.lo, p.causal,
                                                   p.window_left, p.window_right, BLOCK_N);
    tiles_begin = ck.begin;
    tiles_end = ck.end;
  }

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
  // The first row chunk of the split that holds new rows writes them to the cache, once, before
  // the tile loop (every chunk reads them from k/v, never from the cache).
  if (p.has_new && w.chunk == 0) {
    const int64_t first = split_begin > w.s.L_cache ? split_begin : w.s.L_cache;
    for (int64_t i = tid; i < (split_end - first) * D; i += kThreads) {
      const int64_t j = first + i / D;
      const int64_t d = i % D;
      const int64_t t = j - L;
      const int64_t k_row = cache_row_offset(p, table, slot, j, p.kc_stride_b, p.kc_stride_s);
      const int64_t v_row = cache_row_offset(p, table, slot, j, p.vc_stride_b, p.vc_stride_s);
      if (k_row < 0) continue;  // a page outside the cache: never written
      k_cache[k_row + h * p.kc_stride_h + d * p.kc_stride_d] =
          k_new[b * p.kn_stride_b + t * p.kn_stride_t + h * p.kn_stride_h + d * p.kn_stride_d];
      v_cache[v_row + h * p.vc_stride_h + d * p.vc_stride_d] =
          v_new[b * p.vn_stride_b + t * p.vn_stride_t + h * p.vn_stride_h + d * p.vn_stride_d];
    }
  }

  float acc[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[it][e] = 0.f;
  }
  __syncthreads();

  for (int64_t tile = tiles_begin; tile < tiles_end; tile += BLOCK_N) {
    const int n_valid = static_cast<int>(min(static_cast<int64_t>(BLOCK_N), tiles_end - tile));
    if (table) {  // paged: one block-table read per key row of the tile, before any load
      if (tid < BLOCK_N) {
        krow_s[tid] = tid < n_valid ? cache_row_offset(p, table, 0, tile + tid, p.kc_stride_b, p.kc_stride_s) : -1;
        vrow_s[tid] = tid < n_valid ? cache_row_offset(p, table, 0, tile + tid, p.vc_stride_b, p.vc_stride_s) : -1;
      }
      __syncthreads();
    }

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
          const int64_t k_row = table ? krow_s[n] : slot * p.kc_stride_b + j * p.kc_stride_s;
          const int64_t v_row = table ? vrow_s[n] : slot * p.vc_stride_b + j * p.vc_stride_s;
          const int64_t kc_off = k_row + h * p.kc_stride_h + d0;
          const int64_t vc_off = v_row + h * p.vc_stride_h + d0;
          if (p.has_new && j >= L) {  // a new row: 0 <= j - L < Tq because j < Lk <= L + Tq
            const int64_t t = j - L;
            kv = *reinterpret_cast<const uint4*>(
                k_new + b * p.kn_stride_b + t * p.kn_stride_t + h * p.kn_stride_h + d0);
            vv = *reinterpret_cast<const uint4*>(
                v_new + b * p.vn_stride_b + t * p.vn_stride_t + h * p.vn_stride_h + d0);
          } else if (k_row >= 0) {  // (a page outside the cache reads as zeros)
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
          const int64_t k_row = table ? krow_s[n] : slot * p.kc_stride_b + j * p.kc_stride_s;
          const int64_t v_row = table ? vrow_s[n] : slot * p.vc_stride_b + j * p.vc_stride_s;
          const int64_t kc_off = k_row + h * p.kc_stride_h + d * p.kc_stride_d;
          const int64_t vc_off = v_row + h * p.vc_stride_h + d * p.vc_stride_d;
          if (p.has_new && j >= L) {
            const int64_t t = j - L;
            kv = k_new[b * p.kn_stride_b + t * p.kn_stride_t + h * p.kn_stride_h + d * p.kn_stride_d];
            vv = v_new[b * p.vn_stride_b + t * p.vn_stride_t + h * p.vn_stride_h + d * p.vn_stride_d];
          } else if (k_row >= 0) {
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
          if (VARIANT) {
            const decode::RowBounds rb =
                decode::row_bounds(t, Lk, Tq, w.s.lo, tiles_end, p.causal, p.window_left, p.window_right);
            const int hq = h * G + (row0 + r) % G;
            const float slope_log2 =
                p.alibi_slopes ? p.alibi_slopes[b * p.alibi_stride_b + hq * p.alibi_stride_h] * static_cast<float>(kLog2e)
                               : 0.f;
            const bool visible = n < n_valid && j >= rb.lo && j <= rb.hi;
            sp_s[r * SP_STRIDE + n] =
                visible ? decode::variant_score(dots[k], p.scale_log2, p.softcap_in, p.softcap_out, slope_log2, rb.diag - j)
                        : neg_inf();
          } else {
            const bool visible = n < n_valid && (!p.causal || j <= t + Lk - Tq);
            sp_s[r * SP_STRIDE + n] = visible ? dots[k] * p.scale_log2 : neg_inf();
          }
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
    const float lse = l > 0.f ? (m_s[r] + log2f(l)) * kLn2 : neg_inf();
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

}  // namespace kv_cache
}  // namespace pytorch_mqa
