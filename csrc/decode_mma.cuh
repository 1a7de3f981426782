// Split-KV decoding attention on tensor cores (fp16 / bf16, sm_80+), with the append of the new
// K/V rows fused into the same kernel. Semantics and work split: decode_common.cuh.
//
// One block of 4 warps serves one m16 tile of packed rows (query position, query head of the
// group) of one (batch, KV head) and one slice of the live keys. Key tiles of 64 rows are
// streamed through shared memory with cp.async (LDGSTS) in a ring of kStages stages, so
// kStages - 1 tiles are in flight while one is computed. Each warp owns 16 keys of every tile:
// S = Q K^T with mma.sync m16n8k16 (q is loaded to shared memory once, in its own dtype), an
// online softmax in registers (quad shuffles), and O += P V with P taken straight from the score
// fragments. The warps' (m, l, O) states are merged through shared memory at the end. The new
// rows are read from k / v (never from the cache) and written to the cache once, before the
// loop, by the first row chunk of the split that holds them. Lane / fragment / stage index math:
// decode_index.h (tested on the host).
#pragma once

#include "decode_common.cuh"

namespace pytorch_mqa {
namespace kv_cache {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaRows = 16;                       // one m16 tile of packed rows per block
constexpr int kWarpKeys = 16;                      // keys per warp and tile (the k16 of P @ V)
constexpr int kMmaBlockN = kMmaWarps * kWarpKeys;  // keys per tile
static_assert(kSplitAlign % kMmaBlockN == 0, "a split is a whole number of tiles");

template <int D_MAX>
struct MmaConfig {
  static constexpr int kStages = D_MAX <= 128 ? 3 : 2;
  static constexpr int kStride = D_MAX + 8;   // elements per shared row: +16 B, no bank conflicts
  static constexpr int kChunks = D_MAX / 8;   // 16-byte chunks per row
  static constexpr int kKSteps = D_MAX / 16;  // k16 steps of Q K^T
  static constexpr int kNTiles = D_MAX / 8;   // n8 tiles of O
  static constexpr int kStageElems = 2 * kMmaBlockN * kStride;  // K tile, then V tile
  static constexpr int kQElems = kMmaRows * kStride;
  static constexpr size_t kSmemBytes = 2ull * (kQElems + kStages * kStageElems);
  // Epilogue: per warp O (16 x D_MAX fp32), m and l, in the (then idle) stage buffers.
  static constexpr size_t kEpilogueBytes = 4ull * kMmaWarps * kMmaRows * (D_MAX + 2);
  static_assert(D_MAX % 16 == 0, "head-dim bound must be a multiple of 16");
  static_assert(kEpilogueBytes <= 2ull * kStages * kStageElems, "epilogue fits in the stages");
};

// ---- PTX wrappers -------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 fills the 16 bytes with zeros (no global read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats -> one register of two 16-bit values, the first in the low half (lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2_raw(T lo, T hi) {
  const uint16_t l = *reinterpret_cast<const uint16_t*>(&lo);
  const uint16_t h = *reinterpret_cast<const uint16_t*>(&hi);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

// ---- the kernel ---------------------------------------------------------------------------

// VARIANT: window, softcap, ALiBi and left padding (per-row key bounds, the score transform);
// without it the inner loop is the plain causal / full one. Paged caches and cache_batch_idx are
// runtime branches, uniform per block (they change addresses, not the inner loop).
template <typename T, int D_MAX, bool EXACT_D, bool VARIANT>
__global__ void __launch_bounds__(kMmaThreads)
    attention_with_kv_cache_mma_kernel(const KvCacheParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = MmaConfig<D_MAX>;
  constexpr int STAGES = Cfg::kStages;
  constexpr int STRIDE = Cfg::kStride;
  constexpr int CHUNKS = Cfg::kChunks;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* stage_s = q_s + Cfg::kQElems;

  const BlockWork w = block_work(p);
  if (!w.active) return;  // whole block: a split past the live keys writes nothing
  const int D = EXACT_D ? D_MAX : p.head_dim;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int G = p.group;
  const int Tq = p.seqlen_q;
  const int row0 = w.chunk * kMmaRows;
  const int b = w.b, hk = w.hk;
  const T* q = static_cast<const T*>(p.q);
  T* k_cache = static_cast<T*>(p.k_cache);
  T* v_cache = static_cast<T*>(p.v_cache);
  const T* k_new = static_cast<const T*>(p.k_new);
  const T* v_new = static_cast<const T*>(p.v_new);
  // Paged: the sequence's block-table row; contiguous: its cache slot (b, or cache_batch_idx[b]).
  const int32_t* table = p.block_table ? p.block_table + w.s.slot * p.bt_stride : nullptr;
  T* kc_base = k_cache + (table ? 0 : w.s.slot * p.kc_stride_b) + hk * p.kc_stride_h;
  T* vc_base = v_cache + (table ? 0 : w.s.slot * p.vc_stride_b) + hk * p.vc_stride_h;
  const T* kn_base = p.has_new ? k_new + b * p.kn_stride_b + hk * p.kn_stride_h : kc_base;
  const T* vn_base = p.has_new ? v_new + b * p.vn_stride_b + hk * p.vn_stride_h : vc_base;

  // New rows of this split -> cache, once (16-byte chunks: the launcher checked the alignment).
  if (p.has_new && w.chunk == 0) {
    const int64_t first = w.keys.begin > w.s.L_cache ? w.keys.begin : w.s.L_cache;
    for (int64_t i = tid; i < (w.keys.end - first) * CHUNKS; i += kMmaThreads) {
      const int64_t j = first + i / CHUNKS;
      const int c = static_cast<int>(i % CHUNKS);
      if (!EXACT_D && c * 8 >= D) continue;
      const int64_t t = j - w.s.L;
      int64_t k_off = j * p.kc_stride_s, v_off = j * p.vc_stride_s;
      if (table) {
        k_off = cache_row_offset(p, table, 0, j, p.kc_stride_b, p.kc_stride_s);
        v_off = cache_row_offset(p, table, 0, j, p.vc_stride_b, p.vc_stride_s);
        if (k_off < 0) continue;  // a page outside the cache: never written
      }
      *reinterpret_cast<uint4*>(kc_base + k_off + c * 8) = *reinterpret_cast<const uint4*>(kn_base + t * p.kn_stride_t + c * 8);
      *reinterpret_cast<uint4*>(vc_base + v_off + c * 8) = *reinterpret_cast<const uint4*>(vn_base + t * p.vn_stride_t + c * 8);
    }
  }

  // q rows -> shared memory, once, in the input dtype (zero past D and past the last row).
  for (int i = tid; i < kMmaRows * D_MAX; i += kMmaThreads) {
    const int r = i / D_MAX, d = i % D_MAX;
    T val = from_float<T>(0.f);
    if (row0 + r < p.rows && d < D) {
      const decode::PackedRow pr = decode::packed_row(row0 + r, hk, G);
      val = q[b * p.q_stride_b + pr.t * p.q_stride_t + pr.hq * p.q_stride_h + d * p.q_stride_d];
    }
    q_s[r * STRIDE + d] = val;
  }

  // Keys this row chunk can see: the causal limit of its last row bounds the loop; with VARIANT
  // also the window of its first row (tiles stay aligned to kMmaBlockN).
  const int last = min(row0 + kMmaRows, p.rows) - 1;
  int64_t key_end = w.keys.end;
  int64_t key_begin = w.keys.begin;
  if (VARIANT) {
    const decode::KeyRange ck = decode::chunk_keys(w.keys, row0 / G, last / G, w.s.Lk, Tq, w.s.lo, p.causal,
                                                   p.window_left, p.window_right, kMmaBlockN);
    key_begin = ck.begin;
    key_end = ck.end;
  } else if (p.causal) {
    const int64_t lim = last / G + w.s.Lk - Tq + 1;
    key_end = key_end < lim ? key_end : lim;
  }
  const int n_tiles = key_end > key_begin ? static_cast<int>(decode::ceil_div(key_end - key_begin, kMmaBlockN)) : 0;

  // Paged caches: the block-table entries of the next tile to load, one per kPageAlign keys, read
  // one tile ahead (tiles are loaded in order), so the table read's latency hides behind a tile.
  constexpr int kSubBlocks = kMmaBlockN / decode::kPageAlign;
  int32_t pages[kSubBlocks];
  auto fetch_pages = [&](int i) {
#pragma unroll
    for (int sb = 0; sb < kSubBlocks; ++sb) {
      const int64_t j0 = key_begin + static_cast<int64_t>(i) * kMmaBlockN + sb * decode::kPageAlign;
      pages[sb] = i < n_tiles && j0 < key_end ? table[decode::page_slot(j0, p.page_size).page_index] : -1;
    }
  };
  if (table) fetch_pages(0);

  // Tile i -> stage i % STAGES: K rows then V rows, zero-filled past key_end and past D.
  auto load_tile = [&](int i) {
    T* ks = stage_s + decode::stage_of(i, STAGES) * Cfg::kStageElems;
    if (table) {  // paged: each aligned group of kPageAlign keys lies in one page
      const int64_t t0 = key_begin + static_cast<int64_t>(i) * kMmaBlockN;
#pragma unroll
      for (int sb = 0; sb < kSubBlocks; ++sb) {
        const int64_t j0 = t0 + sb * decode::kPageAlign;
        const int64_t page = pages[sb];
        const bool page_ok = page >= 0 && page < p.num_pages;
        const int64_t prow = page_ok ? decode::page_slot(j0, p.page_size).row : 0;
        const T* kpage = kc_base + (page_ok ? page * p.kc_stride_b + prow * p.kc_stride_s : 0);
        const T* vpage = vc_base + (page_ok ? page * p.vc_stride_b + prow * p.vc_stride_s : 0);
        for (int idx = tid; idx < 2 * decode::kPageAlign * CHUNKS; idx += kMmaThreads) {
          const int is_v = idx / (decode::kPageAlign * CHUNKS);
          const int n = (idx / CHUNKS) % decode::kPageAlign;
          const int c = idx % CHUNKS;
          const int64_t j = j0 + n;
          const bool ok = j < key_end && (EXACT_D || c * 8 < D);
          const T* src = is_v ? vpage : kpage;
          bool load = ok;
          if (ok) {
            if (j >= w.s.L_cache) {  // a new row (only with new k/v): 0 <= j - L < Tq
              src = (is_v ? vn_base : kn_base) + (j - w.s.L) * (is_v ? p.vn_stride_t : p.kn_stride_t) + c * 8;
            } else {
              src += n * (is_v ? p.vc_stride_s : p.kc_stride_s) + c * 8;
              load = page_ok;  // a page outside the cache reads as zeros
            }
          }
          cp_async_16(ks + is_v * kMmaBlockN * STRIDE + (sb * decode::kPageAlign + n) * STRIDE + c * 8, src,
                      load ? 16 : 0);
        }
      }
      fetch_pages(i + 1);
      return;
    }
    for (int idx = tid; idx < 2 * kMmaBlockN * CHUNKS; idx += kMmaThreads) {
      const int is_v = idx / (kMmaBlockN * CHUNKS);
      const int n = (idx / CHUNKS) % kMmaBlockN;
      const int c = idx % CHUNKS;
      const int64_t j = key_begin + static_cast<int64_t>(i) * kMmaBlockN + n;
      const bool ok = j < key_end && (EXACT_D || c * 8 < D);
      const T* src = is_v ? vc_base : kc_base;
      if (ok) {
        if (j >= w.s.L_cache) {  // a new row (only with new k/v): 0 <= j - L < Tq
          src = (is_v ? vn_base : kn_base) + (j - w.s.L) * (is_v ? p.vn_stride_t : p.kn_stride_t) + c * 8;
        } else {
          src += j * (is_v ? p.vc_stride_s : p.kc_stride_s) + c * 8;
        }
      }
      cp_async_16(ks + is_v * kMmaBlockN * STRIDE + n * STRIDE + c * 8, src, ok ? 16 : 0);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_tiles) load_tile(s);
    cp_async_commit();  // one group per tile, empty or not, so the wait counts stay uniform
  }

  const int g = lane >> 2;
  float acc[Cfg::kNTiles][4];
#pragma unroll
  for (int nt = 0; nt < Cfg::kNTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  float m_run[2] = {neg_inf(), neg_inf()};  // rows g and g + 8, base 2
  float l_run[2] = {0.f, 0.f};              // this lane's part of the row sums
  // Causal offsets of this lane's two rows: key j is visible iff j <= t + Lk - Tq. VARIANT: key j
  // is visible iff vlo <= j <= vhi, at ALiBi distance |diag - j| with the row's slope (int32: keys
  // are below S, which fits in int32; this keeps the variant kernel's registers down).
  int64_t row_lim[2];
  int vlo[2], vhi[2], vdiag[2];
  float slope_log2[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = row0 + g + 8 * rr;
    row_lim[rr] = r >= p.rows ? -1 : (p.causal ? r / G + w.s.Lk - Tq : key_end - 1);
    if (VARIANT) {
      const decode::PackedRow pr = decode::packed_row(r < p.rows ? r : 0, hk, G);
      const decode::RowBounds rb = decode::row_bounds(pr.t, w.s.Lk, Tq, w.s.lo, key_end, p.causal, p.window_left,
                                                      p.window_right);
      vlo[rr] = static_cast<int>(rb.lo);
      vhi[rr] = r >= p.rows ? -1 : static_cast<int>(rb.hi);
      vdiag[rr] = static_cast<int>(rb.diag);
      slope_log2[rr] = p.alibi_slopes
                           ? p.alibi_slopes[b * p.alibi_stride_b + pr.hq * p.alibi_stride_h] * static_cast<float>(kLog2e)
                           : 0.f;
    }
  }

  for (int i = 0; i < n_tiles; ++i) {
    cp_async_wait<STAGES - 2>();  // tile i has landed
    __syncthreads();              // ... for every thread, and tile i - 1's stage is free
    const int64_t pf = decode::prefetch_tile(i, STAGES);
    if (pf < n_tiles) load_tile(static_cast<int>(pf));
    cp_async_commit();

    const T* ks = stage_s + decode::stage_of(i, STAGES) * Cfg::kStageElems + warp * kWarpKeys * STRIDE;
    const T* vs = ks + kMmaBlockN * STRIDE;
    // ---- S = Q K^T for this warp's 16 keys (two n8 tiles).
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
      if (!EXACT_D && kk * 16 >= D) break;
      uint32_t a[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const decode::Coord co = decode::mma_a(lane, r, 0);
        a[r] = *reinterpret_cast<const uint32_t*>(&q_s[co.row * STRIDE + kk * 16 + co.col]);
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bk[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const decode::Coord co = decode::mma_b(lane, r, 0);  // {k = head dim, n = key}
          bk[r] = *reinterpret_cast<const uint32_t*>(&ks[(nt * 8 + co.col) * STRIDE + kk * 16 + co.row]);
        }
        mma_16816<T>(s[nt], a, bk);
      }
    }
    // ---- mask, scale, online softmax (rows g, g + 8; the 4 lanes of a quad share a row).
    const int64_t key0 = key_begin + static_cast<int64_t>(i) * kMmaBlockN + warp * kWarpKeys;
    float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const decode::Coord co = decode::mma_c(lane, v);
        const int64_t j = key0 + nt * 8 + co.col;
        if (VARIANT) {
          const int rr = v >> 1;
          const int jj = static_cast<int>(j);
          const bool ok = jj >= vlo[rr] && jj <= vhi[rr];
          s[nt][v] = ok ? decode::variant_score(s[nt][v], p.scale_log2, p.softcap_in, p.softcap_out, slope_log2[rr],
                                                vdiag[rr] - jj)
                        : neg_inf();
        } else {
          const bool ok = j < key_end && j <= row_lim[v >> 1];
          s[nt][v] = ok ? s[nt][v] * p.scale_log2 : neg_inf();
        }
        mx[v >> 1] = fmaxf(mx[v >> 1], s[nt][v]);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
      const float m_new = fmaxf(m_run[rr], mx[rr]);
      m_use[rr] = m_new == neg_inf() ? 0.f : m_new;  // nothing seen yet: exp2 gives 0, not NaN
      alpha[rr] = exp2f(m_run[rr] - m_use[rr]);
      m_run[rr] = m_new;
      l_run[rr] *= alpha[rr];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        s[nt][v] = exp2f(s[nt][v] - m_use[v >> 1]);
        l_run[v >> 1] += s[nt][v];
      }
    }
    // ---- O = O * alpha + P V: P (16 x 16 keys) is the score fragments, repacked to 16 bits.
    uint32_t pa[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int nt = decode::p_tile_of_a(r);
      pa[r] = pack2<T>(s[nt][decode::p_value_of_a(r, 0)], s[nt][decode::p_value_of_a(r, 1)]);
    }
#pragma unroll
    for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
      acc[nt][0] *= alpha[0];
      acc[nt][1] *= alpha[0];
      acc[nt][2] *= alpha[1];
      acc[nt][3] *= alpha[1];
      if (!EXACT_D && nt * 8 >= D) continue;
      uint32_t bv[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const decode::Coord c0 = decode::mma_b(lane, r, 0);  // {k = key, n = head dim}
        const decode::Coord c1 = decode::mma_b(lane, r, 1);
        bv[r] = pack2_raw<T>(vs[c0.row * STRIDE + nt * 8 + c0.col], vs[c1.row * STRIDE + nt * 8 + c1.col]);
      }
      mma_16816<T>(acc[nt], pa, bv);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages: the epilogue reuses them

  // ---- merge the 4 warps' states: O_w, m_w, l_w through shared memory.
  float* o_s = reinterpret_cast<float*>(stage_s);            // [warp][row][D_MAX]
  float* m_s = o_s + kMmaWarps * kMmaRows * D_MAX;           // [warp][row]
  float* l_s = m_s + kMmaWarps * kMmaRows;                   // [warp][row]
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 1);
    l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 2);
  }
#pragma unroll
  for (int nt = 0; nt < Cfg::kNTiles; ++nt) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const decode::Coord co = decode::mma_c(lane, v);
      o_s[(warp * kMmaRows + co.row) * D_MAX + nt * 8 + co.col] = acc[nt][v];
    }
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      m_s[warp * kMmaRows + g + 8 * rr] = m_run[rr];
      l_s[warp * kMmaRows + g + 8 * rr] = l_run[rr];
    }
  }
  __syncthreads();

  const int rows_here = min(kMmaRows, p.rows - row0);
  const int64_t lse_rows = static_cast<int64_t>(p.batch) * p.heads_q * Tq;  // per split
  for (int i = tid; i < rows_here * D_MAX; i += kMmaThreads) {
    const int r = i / D_MAX, d = i % D_MAX;
    float m_tot = neg_inf();
#pragma unroll
    for (int ww = 0; ww < kMmaWarps; ++ww) m_tot = fmaxf(m_tot, m_s[ww * kMmaRows + r]);
    float l_tot = 0.f, o = 0.f;
    if (m_tot != neg_inf()) {
#pragma unroll
      for (int ww = 0; ww < kMmaWarps; ++ww) {
        const float sc = exp2f(m_s[ww * kMmaRows + r] - m_tot);  // 0 for a warp that saw nothing
        l_tot += l_s[ww * kMmaRows + r] * sc;
        o += o_s[(ww * kMmaRows + r) * D_MAX + d] * sc;
      }
    }
    const float inv = l_tot > 0.f ? 1.f / l_tot : 0.f;
    const decode::PackedRow pr = decode::packed_row(row0 + r, hk, G);
    const int64_t lse_row = (static_cast<int64_t>(b) * p.heads_q + pr.hq) * Tq + pr.t;
    if (d < D) {
      if (p.num_splits == 1) {
        T* out = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * Tq + pr.t) * p.heads_q + pr.hq) * D;
        out[d] = from_float<T>(o * inv);
      } else {
        p.o_partial[(w.split * lse_rows + lse_row) * D + d] = o * inv;
      }
    }
    if (d == 0) {
      const float lse = l_tot > 0.f ? (m_tot + log2f(l_tot)) * kLn2 : neg_inf();
      if (p.num_splits == 1) {
        p.lse[lse_row] = lse;
      } else {
        p.lse_partial[w.split * lse_rows + lse_row] = lse;
      }
    }
  }
#else
  __trap();  // the launcher selects this kernel on sm_80+ only
#endif
}

}  // namespace kv_cache
}  // namespace pytorch_mqa
