// Index math of the CUDA decoding kernels, as small __host__ __device__ functions with no CUDA
// types, so that tests/kernels/csrc_emulation.cpp compiles them with g++ and runs a host emulation
// of the kernel's tile loop (lanes, mma.sync fragments, cp.async stages, splits) against the
// reference. Everything the kernels compute an index with lives here.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PMQA_HD __host__ __device__ __forceinline__
#else
#define PMQA_HD inline
#endif

namespace pytorch_mqa {
namespace decode {

// ---- packed rows: row r of KV head hk is query position t = r / G of query head hk * G + r % G.
struct PackedRow {
  int t;   // query position
  int hq;  // query head
};

PMQA_HD PackedRow packed_row(int row, int hk, int G) { return {row / G, hk * G + row % G}; }

// ---- live keys and splits. Sequence b sees keys [0, Lk) with Lk = clamp(L + n_new, 0, S); keys
// from max(L, 0) on are the new rows (n_new = Tq with new k/v, else 0).
PMQA_HD int64_t live_keys(int64_t L, int64_t n_new, int64_t S) {
  const int64_t lk = L + n_new;
  return lk < 0 ? 0 : (lk > S ? S : lk);
}

PMQA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Keys per split: a span of Lk keys cut into num_splits equal slices, rounded up to `align`.
PMQA_HD int64_t split_chunk(int64_t Lk, int num_splits, int align) {
  const int64_t c = ceil_div(ceil_div(Lk, num_splits), align) * align;
  return c < align ? align : c;
}

// Splits that hold live keys of a span of n keys; at least 1 (split 0 writes the empty result
// when n = 0).
PMQA_HD int active_splits(int64_t n, int num_splits, int align) {
  const int64_t s = ceil_div(n, split_chunk(n, num_splits, align));
  return s < 1 ? 1 : static_cast<int>(s);
}

struct KeyRange {
  int64_t begin, end;  // keys [begin, end); empty when begin >= end
};

// Split `split` of the span [begin, end): equal slices, a multiple of `align` keys each, so a
// span that starts on a multiple of `align` gives splits that do too.
PMQA_HD KeyRange split_range(int split, int64_t begin, int64_t end, int num_splits, int align) {
  const int64_t c = split_chunk(end - begin, num_splits, align);
  const int64_t b = begin + static_cast<int64_t>(split) * c;
  const int64_t e = b + c < end ? b + c : end;
  return {b, e};
}

// ---- the keys of sequence b (absolute cache rows j). Valid keys are [lo, Lk): Lk = live_keys,
// lo = the left padding clamped to [0, L_cache] (L_cache = clamp(L, 0, S), so new rows are never
// below lo). A window (left >= 0) hides every key below (Lk - Tq) - left from every query, so the
// work span starts at the first key query 0 can see, rounded down to `align`. Causal and window
// alignment need no shift for the padding: with j' = j - lo and Lk' = Lk - lo,
// i + Lk' - Tq - j' = i + Lk - Tq - j.
struct SeqSpan {
  int64_t Lk;     // keys [0, Lk) exist (clamped live length)
  int64_t lo;     // first valid key (the left padding)
  int64_t begin;  // first key of the work span, a multiple of align, <= every visible key
};

PMQA_HD SeqSpan seq_span(int64_t L, int64_t n_new, int64_t S, int64_t leftpad, int window_left, int Tq, int align) {
  const int64_t Lk = live_keys(L, n_new, S);
  const int64_t L_cache = live_keys(L, 0, S);
  int64_t lo = leftpad < 0 ? 0 : leftpad;
  if (lo > L_cache) lo = L_cache;
  int64_t first = lo;
  if (window_left >= 0) {
    const int64_t w = Lk - Tq - window_left;
    if (w > first) first = w;
  }
  return {Lk, lo, first / align * align};
}

// Visible keys of query position t: lo <= j <= hi (empty when lo > hi); diag = t + Lk - Tq is the
// key aligned with the query (bottom-right), the ALiBi distance is |diag - j|.
struct RowBounds {
  int64_t lo, hi, diag;
};

PMQA_HD RowBounds row_bounds(int64_t t, int64_t Lk, int Tq, int64_t seq_lo, int64_t key_end, bool causal,
                             int window_left, int window_right) {
  const int64_t diag = t + Lk - Tq;
  int64_t hi = key_end - 1;
  if (causal && diag < hi) hi = diag;
  if (window_right >= 0 && diag + window_right < hi) hi = diag + window_right;
  int64_t lo = seq_lo;
  if (window_left >= 0 && diag - window_left > lo) lo = diag - window_left;
  return {lo, hi, diag};
}

// Keys a row chunk with query positions [t_first, t_last] reads within its split: from the first
// row's lowest visible key (rounded down to align, so tiles stay aligned) to the last row's highest.
PMQA_HD KeyRange chunk_keys(KeyRange split, int64_t t_first, int64_t t_last, int64_t Lk, int Tq, int64_t seq_lo,
                            bool causal, int window_left, int window_right, int align) {
  const RowBounds f = row_bounds(t_first, Lk, Tq, seq_lo, split.end, causal, window_left, window_right);
  const RowBounds l = row_bounds(t_last, Lk, Tq, seq_lo, split.end, causal, window_left, window_right);
  const int64_t lo = f.lo < 0 ? 0 : f.lo / align * align;
  return {lo > split.begin ? lo : split.begin, l.hi + 1 < split.end ? l.hi + 1 : split.end};
}

// Score of a visible key in the base-2 domain, in DESIGN §3's order: softcap, then ALiBi.
// softcap_in = scale / softcap and softcap_out = softcap * log2(e) when softcap > 0;
// slope_log2 = slope * log2(e) (0 without ALiBi); dist = diag - j.
PMQA_HD float variant_score(float dot, float scale_log2, float softcap_in, float softcap_out, float slope_log2,
                            int64_t dist) {
  const float x = softcap_in > 0.f ? tanhf(dot * softcap_in) * softcap_out : dot * scale_log2;
  const float d = static_cast<float>(dist < 0 ? -dist : dist);
  return x - slope_log2 * d;
}

// ---- paged caches: logical row j of a sequence is row j % page_size of page table[j / page_size].
// page_size is a multiple of kPageAlign, so the kPageAlign keys of an aligned group share a page.
constexpr int kPageAlign = 16;

struct PageSlot {
  int page_index;  // index into the sequence's block-table row
  int row;         // row inside the page
};

PMQA_HD PageSlot page_slot(int64_t j, int page_size) {
  const int jj = static_cast<int>(j);  // j < S = max_blocks * page_size, which fits in int32
  const int pi = jj / page_size;
  return {pi, jj - pi * page_size};
}

// Static split count (shapes and SM count only, so a CUDA graph stays valid for any lengths):
// about `waves` blocks per SM, at most one split per `align` cache rows.
PMQA_HD int choose_splits(int64_t blocks_per_split, int64_t S, int align, int sms, int waves, int max_splits) {
  int64_t n = ceil_div(static_cast<int64_t>(waves) * sms, blocks_per_split < 1 ? 1 : blocks_per_split);
  const int64_t cap = ceil_div(S, align);
  if (n > cap) n = cap;
  if (n > max_splits) n = max_splits;
  return n < 1 ? 1 : static_cast<int>(n);
}

// Grid axis 0 of the split kernel: blockIdx.x = (bh * row_chunks + chunk) * num_splits + split.
struct BlockIndex {
  int64_t bh;
  int chunk, split;
};

PMQA_HD BlockIndex block_index(int64_t bid, int row_chunks, int num_splits) {
  const int64_t bhc = bid / num_splits;
  return {bhc / row_chunks, static_cast<int>(bhc % row_chunks), static_cast<int>(bid % num_splits)};
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: per-lane fragment coordinates (PTX ISA,
// "Matrix Fragments for mma.m16n8k16"). g = lane / 4, c = lane % 4.
struct Coord {
  int row, col;
};

// A (16 x 16, row-major): 4 registers of 2 elements; element e of register i.
PMQA_HD Coord mma_a(int lane, int i, int e) {
  const int g = lane >> 2, c = lane & 3;
  return {g + 8 * (i & 1), 2 * c + e + 8 * (i >> 1)};
}

// B (16 x 8, "col" = stored n-major): 2 registers of 2 elements; {row = k, col = n}.
PMQA_HD Coord mma_b(int lane, int i, int e) {
  const int g = lane >> 2, c = lane & 3;
  return {2 * c + e + 8 * i, g};
}

// C / D (16 x 8, fp32): 4 values; value v.
PMQA_HD Coord mma_c(int lane, int v) {
  const int g = lane >> 2, c = lane & 3;
  return {g + 8 * (v >> 1), 2 * c + (v & 1)};
}

// The scores of two adjacent n8 tiles (keys 0-7 and 8-15 of a 16-key slice), in C layout, are
// the A operand of P @ V (16 rows x 16 keys) without moving data: A register i, element e of a
// lane is C value (i & 1) * 2 + e of n-tile (i >> 1) of the same lane.
PMQA_HD int p_tile_of_a(int i) { return i >> 1; }
PMQA_HD int p_value_of_a(int i, int e) { return (i & 1) * 2 + e; }

// ---- cp.async pipeline over key tiles: tile i of a block lives in stage i % stages. Before
// computing tile i the kernel has issued tiles up to i + stages - 1 (one commit group each) and
// waits until at most stages - 1 groups are pending, i.e. until tile i has landed.
PMQA_HD int stage_of(int64_t tile, int stages) { return static_cast<int>(tile % stages); }

// Tile issued while tile i is computed (after the barrier that frees stage (i - 1) % stages).
PMQA_HD int64_t prefetch_tile(int64_t i, int stages) { return i + stages - 1; }

}  // namespace decode
}  // namespace pytorch_mqa
