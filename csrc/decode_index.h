// Index math of the CUDA decoding kernels, as small __host__ __device__ functions with no CUDA
// types, so that tests/kernels/csrc_emulation.cpp compiles them with g++ and runs a host emulation
// of the kernel's tile loop (lanes, mma.sync fragments, cp.async stages, splits) against the
// reference. Everything the kernels compute an index with lives here.
#pragma once

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

// Keys per split: the live keys cut into num_splits equal slices, rounded up to `align`.
PMQA_HD int64_t split_chunk(int64_t Lk, int num_splits, int align) {
  const int64_t c = ceil_div(ceil_div(Lk, num_splits), align) * align;
  return c < align ? align : c;
}

// Splits that hold live keys; at least 1 (split 0 writes the empty result when Lk = 0).
PMQA_HD int active_splits(int64_t Lk, int num_splits, int align) {
  const int64_t n = ceil_div(Lk, split_chunk(Lk, num_splits, align));
  return n < 1 ? 1 : static_cast<int>(n);
}

struct KeyRange {
  int64_t begin, end;  // keys [begin, end); empty when begin >= end
};

PMQA_HD KeyRange split_range(int split, int64_t Lk, int num_splits, int align) {
  const int64_t c = split_chunk(Lk, num_splits, align);
  const int64_t b = static_cast<int64_t>(split) * c;
  const int64_t e = b + c < Lk ? b + c : Lk;
  return {b, e};
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
