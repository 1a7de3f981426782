// Host emulation of the tensor-core decode kernel (csrc/decode_mma.cuh), built with g++ by
// tests/kernels/test_csrc_emulation.py. It runs the kernel's block / warp / lane structure on the
// CPU with the index helpers of csrc/decode_index.h: the grid fold, live-length splits, the new-row
// write, the cp.async stage ring (with checks that a stage is never overwritten before it is
// consumed, nor read before it is loaded), the mma.sync m16n8k16 fragments of every lane (the
// products are formed only from what each lane's fragment registers hold), the quad-shuffle
// online softmax, the warp merge, the partial writes and the combine; and the variant kernel's
// window / softcap / ALiBi / left-padding bounds and the paged, cache_batch_idx addressing with the
// block-table prefetch. Values stay in fp32.
//
//   csrc_emulation selftest              fragment maps against the PTX ISA tables
//   csrc_emulation IN OUT                run one case (binary protocol of the Python test)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../../csrc/decode_index.h"

using namespace pytorch_mqa::decode;

namespace {

constexpr int kWarps = 4, kRows = 16, kWarpKeys = 16, kBlockN = 64, kSplitAlign = 64, kWaves = 2, kMaxSplits = 1024;
const float kNegInf = -INFINITY;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "emulation check failed: %s\n", what);
  std::exit(1);
}

// ---- fragment maps, written from the PTX ISA figures with the element index i of a0..a7 etc.
int selftest() {
  for (int lane = 0; lane < 32; ++lane) {
    const int gid = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 8; ++i) {  // A: a0..a7, two per register
      const int row = (i == 2 || i == 3 || i == 6 || i == 7) ? gid + 8 : gid;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      const Coord c = mma_a(lane, i / 2, i % 2);
      if (c.row != row || c.col != col) fail("mma_a differs from the PTX A fragment layout");
    }
    for (int i = 0; i < 4; ++i) {  // B: b0..b3
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      const Coord c = mma_b(lane, i / 2, i % 2);
      if (c.row != row || c.col != gid) fail("mma_b differs from the PTX B fragment layout");
    }
    for (int i = 0; i < 4; ++i) {  // C/D: c0..c3
      const Coord c = mma_c(lane, i);
      if (c.row != (i < 2 ? gid : gid + 8) || c.col != tig * 2 + (i & 1)) fail("mma_c differs from the PTX C layout");
    }
  }
  // Every element of A (16x16), B (16x8), C (16x8) is held by exactly one (lane, register, element).
  int a_cov[16][16] = {}, b_cov[16][8] = {}, c_cov[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r)
      for (int e = 0; e < 2; ++e) ++a_cov[mma_a(lane, r, e).row][mma_a(lane, r, e).col];
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < 2; ++e) ++b_cov[mma_b(lane, r, e).row][mma_b(lane, r, e).col];
    for (int v = 0; v < 4; ++v) ++c_cov[mma_c(lane, v).row][mma_c(lane, v).col];
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j)
      if (a_cov[i][j] != 1) fail("A fragments do not tile 16x16");
    for (int j = 0; j < 8; ++j)
      if (b_cov[i][j] != 1 || c_cov[i][j] != 1) fail("B/C fragments do not tile");
  }
  // The score fragments of two n8 tiles are the A operand of P V: same lane, same (row, key).
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 4; ++r)
      for (int e = 0; e < 2; ++e) {
        const Coord a = mma_a(lane, r, e);
        const Coord c = mma_c(lane, p_value_of_a(r, e));
        if (a.row != c.row || a.col != p_tile_of_a(r) * 8 + c.col) fail("P reuse of the score fragments");
      }
  std::printf("selftest ok\n");
  return 0;
}

// One warp-wide mma: D += A B from per-lane fragments only (a[lane][reg][e], b[lane][reg][e]).
void warp_mma(float c[32][4], const float a[32][4][2], const float b[32][2][2]) {
  float A[16][16], Bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r)
      for (int e = 0; e < 2; ++e) A[mma_a(lane, r, e).row][mma_a(lane, r, e).col] = a[lane][r][e];
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < 2; ++e) Bm[mma_b(lane, r, e).row][mma_b(lane, r, e).col] = b[lane][r][e];
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int v = 0; v < 4; ++v) {
      const Coord co = mma_c(lane, v);
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[co.row][k] * Bm[k][co.col];
      c[lane][v] += s;
    }
}

struct Case {
  int B, Tq, Hq, Hkv, D, has_new, causal, sms;
  int wl, wr, alibi_kind, page_size, dim0, dim1, table_rows, max_blocks, has_bidx, has_lpad;
  float scale, softcap;
  std::vector<int32_t> seqlens, bidx, lpad, table;
  std::vector<float> alibi, q, kc, vc, kn, vn;
};

float read_all(FILE* f, void* dst, size_t bytes) {
  if (std::fread(dst, 1, bytes, f) != bytes) fail("short input");
  return 0.f;
}

// Input: 18 int32 (B, Tq, Hq, Hkv, D, has_new, causal, sms, window_left, window_right,
// alibi_kind 0/1 (Hq,)/2 (B, Hq), page_size (0: contiguous), dim0, dim1 (caches (dim0, dim1, Hkv,
// D): slots x S, or pages x page_size), table_rows, max_blocks, has_batch_idx, has_leftpad), 2
// float32 (scale, softcap), seqlens, batch_idx?, leftpad?, table?, alibi?, q, k_cache, v_cache,
// k?, v? (float32).
int run(const char* in_path, const char* out_path) {
  FILE* f = std::fopen(in_path, "rb");
  if (!f) fail("cannot open input");
  Case cs;
  int hdr[18];
  read_all(f, hdr, sizeof hdr);
  cs.B = hdr[0], cs.Tq = hdr[1], cs.Hq = hdr[2], cs.Hkv = hdr[3], cs.D = hdr[4];
  cs.has_new = hdr[5], cs.causal = hdr[6], cs.sms = hdr[7], cs.wl = hdr[8], cs.wr = hdr[9], cs.alibi_kind = hdr[10];
  cs.page_size = hdr[11], cs.dim0 = hdr[12], cs.dim1 = hdr[13], cs.table_rows = hdr[14], cs.max_blocks = hdr[15];
  cs.has_bidx = hdr[16], cs.has_lpad = hdr[17];
  float fl[2];
  read_all(f, fl, sizeof fl);
  cs.scale = fl[0], cs.softcap = fl[1];
  const bool paged = cs.page_size > 0;
  const int B = cs.B, Tq = cs.Tq, Hq = cs.Hq, Hkv = cs.Hkv, D = cs.D, G = Hq / Hkv;
  const int dim1 = cs.dim1;
  const int S = paged ? cs.max_blocks * cs.page_size : dim1;
  const int cache_slots = paged ? cs.table_rows : cs.dim0;
  auto rdi = [&](std::vector<int32_t>& v, size_t n) { v.resize(n); read_all(f, v.data(), n * sizeof(int32_t)); };
  auto rd = [&](std::vector<float>& v, size_t n) { v.resize(n); read_all(f, v.data(), n * sizeof(float)); };
  rdi(cs.seqlens, B);
  if (cs.has_bidx) rdi(cs.bidx, B);
  if (cs.has_lpad) rdi(cs.lpad, B);
  if (paged) rdi(cs.table, size_t(cs.table_rows) * cs.max_blocks);
  if (cs.alibi_kind) rd(cs.alibi, size_t(cs.alibi_kind == 2 ? B : 1) * Hq);
  rd(cs.q, size_t(B) * Tq * Hq * D);
  rd(cs.kc, size_t(cs.dim0) * dim1 * Hkv * D);
  rd(cs.vc, size_t(cs.dim0) * dim1 * Hkv * D);
  if (cs.has_new) {
    rd(cs.kn, size_t(B) * Tq * Hkv * D);
    rd(cs.vn, size_t(B) * Tq * Hkv * D);
  }
  std::fclose(f);

  // The launcher's choices (attention_with_kv_cache.cu): the variant kernel for any of window,
  // softcap, ALiBi, left padding; the base-2 score constants.
  const bool variant = cs.wl >= 0 || cs.wr >= 0 || cs.softcap > 0.f || cs.alibi_kind || cs.has_lpad;
  const double kLog2e = 1.4426950408889634;
  const float scale_log2 = static_cast<float>(double(cs.scale) * kLog2e);
  const float softcap_in = cs.softcap > 0.f ? static_cast<float>(double(cs.scale) / cs.softcap) : 0.f;
  const float softcap_out = cs.softcap > 0.f ? static_cast<float>(double(cs.softcap) * kLog2e) : 0.f;
  const int alibi_stride_b = cs.alibi_kind == 2 ? Hq : 0;

  const int D_MAX = D <= 64 ? 64 : (D <= 128 ? 128 : 256);
  const int STAGES = D_MAX <= 128 ? 3 : 2;
  const int rows = G * Tq;
  const int row_chunks = static_cast<int>(ceil_div(rows, kRows));
  const int ns = choose_splits(int64_t(B) * Hkv * row_chunks, S, kSplitAlign, cs.sms, kWaves, kMaxSplits);
  const int64_t n_rows = int64_t(B) * Hq * Tq;
  std::vector<float> o_part(size_t(ns) * n_rows * D, NAN), lse_part(size_t(ns) * n_rows, NAN);
  std::vector<float> out(size_t(B) * Tq * Hq * D, NAN), lse(n_rows, NAN);
  // Physical cache element: (slot or page, row, head, dim).
  auto phys = [&](std::vector<float>& c, int64_t slot, int64_t row, int h, int d) -> float& {
    if (slot < 0 || slot >= cs.dim0 || row < 0 || row >= dim1) fail("cache access outside the cache tensor");
    return c[((size_t(slot) * dim1 + row) * Hkv + h) * D + d];
  };
  auto kn_at = [&](std::vector<float>& c, int b, int64_t t, int h, int d) -> float& {
    if (t < 0 || t >= Tq) fail("new-row read outside [0, Tq)");
    return c[((size_t(b) * Tq + t) * Hkv + h) * D + d];
  };
  // cache_row_offset (decode_common.cuh) as (page or slot, row); page -1: outside the cache.
  struct Row {
    int64_t slot, row;
  };
  auto table_at = [&](int64_t trow, int idx) -> int64_t {
    if (trow < 0 || trow >= cs.table_rows || idx < 0 || idx >= cs.max_blocks) fail("block-table read out of range");
    return cs.table[size_t(trow) * cs.max_blocks + idx];
  };
  auto cache_row = [&](int64_t slot, int64_t j) -> Row {
    if (j < 0 || j >= S) fail("cache row outside [0, S)");
    if (!paged) return {slot, j};
    const PageSlot ps = page_slot(j, cs.page_size);
    const int64_t page = table_at(slot, ps.page_index);
    return page < 0 || page >= cs.dim0 ? Row{-1, 0} : Row{page, ps.row};
  };
  // seq_work (decode_common.cuh).
  struct Seq {
    int64_t L, Lk, L_cache, lo, begin, slot;
  };
  auto seq_work = [&](int b) {
    Seq s;
    s.L = cs.seqlens[b];
    s.slot = cs.has_bidx ? cs.bidx[b] : b;
    const SeqSpan sp = seq_span(s.L, cs.has_new ? Tq : 0, S, cs.has_lpad ? cs.lpad[b] : 0, cs.wl, Tq, kSplitAlign);
    s.Lk = sp.Lk, s.lo = sp.lo, s.begin = sp.begin;
    s.L_cache = cs.has_new ? live_keys(s.L, 0, S) : s.Lk;
    if (s.slot < 0 || s.slot >= cache_slots) s.slot = 0, s.Lk = s.lo = s.begin = s.L_cache = 0;
    return s;
  };

  const int64_t grid = int64_t(B) * Hkv * row_chunks * ns;
  int32_t tiles_computed = 0;  // key tiles of all blocks: the work, which a window must bound
  for (int64_t bid = 0; bid < grid; ++bid) {
    const BlockIndex bi = block_index(bid, row_chunks, ns);
    const int b = int(bi.bh / Hkv), hk = int(bi.bh % Hkv);
    const Seq sq = seq_work(b);
    const int64_t L = sq.L, Lk = sq.Lk, L_cache = sq.L_cache;
    if (bi.split >= active_splits(Lk - sq.begin, ns, kSplitAlign)) continue;
    const KeyRange kr = split_range(bi.split, sq.begin, Lk, ns, kSplitAlign);
    const int row0 = bi.chunk * kRows;
    if (cs.has_new && bi.chunk == 0) {
      for (int64_t j = kr.begin > L_cache ? kr.begin : L_cache; j < kr.end; ++j) {
        if (j < 0 || j >= S || j - L < 0 || j - L >= Tq) fail("new-row write outside [0, S) or [0, Tq)");
        const Row cr = cache_row(sq.slot, j);
        if (cr.slot < 0) continue;
        for (int d = 0; d < D; ++d) {
          phys(cs.kc, cr.slot, cr.row, hk, d) = kn_at(cs.kn, b, j - L, hk, d);
          phys(cs.vc, cr.slot, cr.row, hk, d) = kn_at(cs.vn, b, j - L, hk, d);
        }
      }
    }
    std::vector<float> q_s(size_t(kRows) * D_MAX, 0.f);
    for (int r = 0; r < kRows; ++r)
      for (int d = 0; d < D; ++d)
        if (row0 + r < rows) {
          const PackedRow pr = packed_row(row0 + r, hk, G);
          q_s[r * D_MAX + d] = cs.q[((size_t(b) * Tq + pr.t) * Hq + pr.hq) * D + d];
        }
    const int last = (row0 + kRows < rows ? row0 + kRows : rows) - 1;
    int64_t key_end = kr.end, key_begin = kr.begin;
    if (variant) {
      const KeyRange ck = chunk_keys(kr, row0 / G, last / G, Lk, Tq, sq.lo, cs.causal, cs.wl, cs.wr, kBlockN);
      key_begin = ck.begin, key_end = ck.end;
      if (key_begin % kBlockN != 0) fail("a variant tile range does not start on a tile boundary");
    } else if (cs.causal) {
      const int64_t lim = last / G + Lk - Tq + 1;
      key_end = key_end < lim ? key_end : lim;
    }
    const int n_tiles = key_end > key_begin ? int(ceil_div(key_end - key_begin, kBlockN)) : 0;
    // Paged: block-table entries of the next tile to load, fetched one tile ahead (fetch_pages).
    constexpr int kSub = kBlockN / kPageAlign;
    int64_t pages[kSub];
    auto fetch_pages = [&](int64_t i) {
      for (int sb = 0; sb < kSub; ++sb) {
        const int64_t j0 = key_begin + i * kBlockN + sb * kPageAlign;
        pages[sb] = i < n_tiles && j0 < key_end ? table_at(sq.slot, page_slot(j0, cs.page_size).page_index) : -1;
      }
    };
    if (paged) fetch_pages(0);
    // Stage ring: K then V tiles of kBlockN x D_MAX, tagged with the tile they hold.
    std::vector<float> stage(size_t(STAGES) * 2 * kBlockN * D_MAX);
    std::vector<int64_t> tag(STAGES, -1);
    std::vector<char> consumed(STAGES, 1);
    auto load_tile = [&](int64_t i) {
      const int st = stage_of(i, STAGES);
      if (!consumed[st]) fail("cp.async would overwrite a stage that was not consumed yet");
      tag[st] = i;
      consumed[st] = 0;
      for (int is_v = 0; is_v < 2; ++is_v)
        for (int n = 0; n < kBlockN; ++n) {
          const int64_t j = key_begin + i * kBlockN + n;
          const int sb = n / kPageAlign;
          const int64_t page = paged ? pages[sb] : 0;
          const bool page_ok = page >= 0 && page < cs.dim0;
          if (paged && j % kPageAlign == 0 && j < key_end && (j < 0 || j >= S)) fail("tile row outside [0, S)");
          const int64_t prow = paged && page_ok ? page_slot(key_begin + i * kBlockN + sb * kPageAlign, cs.page_size).row : 0;
          for (int d = 0; d < D_MAX; ++d) {
            float val = 0.f;
            if (j < key_end && d < D) {
              if (j >= L_cache) {
                val = kn_at(is_v ? cs.vn : cs.kn, b, j - L, hk, d);
              } else if (!paged) {
                val = phys(is_v ? cs.vc : cs.kc, sq.slot, j, hk, d);
              } else if (page_ok) {
                val = phys(is_v ? cs.vc : cs.kc, page, prow + n % kPageAlign, hk, d);
              }
            }
            stage[((size_t(st) * 2 + is_v) * kBlockN + n) * D_MAX + d] = val;
          }
        }
      if (paged) fetch_pages(i + 1);
    };
    for (int s = 0; s < STAGES - 1; ++s)
      if (s < n_tiles) load_tile(s);

    const int NT = D_MAX / 8;
    // Per warp, per lane state.
    std::vector<float> acc(size_t(kWarps) * 32 * NT * 4, 0.f);
    float m_run[kWarps][32][2], l_run[kWarps][32][2];
    for (int w = 0; w < kWarps; ++w)
      for (int l = 0; l < 32; ++l) m_run[w][l][0] = m_run[w][l][1] = kNegInf, l_run[w][l][0] = l_run[w][l][1] = 0.f;
    tiles_computed += n_tiles;
    for (int i = 0; i < n_tiles; ++i) {
      const int st = stage_of(i, STAGES);
      if (tag[st] != i) fail("tile computed from a stage that does not hold it");
      if (i > 0) consumed[stage_of(i - 1, STAGES)] = 1;  // the barrier after wait: tile i - 1 done
      const int64_t pf = prefetch_tile(i, STAGES);
      if (pf < n_tiles) load_tile(pf);
      const float* ks = &stage[(size_t(st) * 2 + 0) * kBlockN * D_MAX];
      const float* vs = &stage[(size_t(st) * 2 + 1) * kBlockN * D_MAX];
      for (int w = 0; w < kWarps; ++w) {
        float s[2][32][4] = {};
        for (int kk = 0; kk * 16 < D; ++kk) {
          float a[32][4][2];
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r)
              for (int e = 0; e < 2; ++e) {
                const Coord co = mma_a(lane, r, e);
                a[lane][r][e] = q_s[co.row * D_MAX + kk * 16 + co.col];
              }
          for (int nt = 0; nt < 2; ++nt) {
            float bk[32][2][2];
            for (int lane = 0; lane < 32; ++lane)
              for (int r = 0; r < 2; ++r)
                for (int e = 0; e < 2; ++e) {
                  const Coord co = mma_b(lane, r, e);
                  bk[lane][r][e] = ks[(w * kWarpKeys + nt * 8 + co.col) * D_MAX + kk * 16 + co.row];
                }
            warp_mma(s[nt], a, bk);
          }
        }
        const int64_t key0 = key_begin + int64_t(i) * kBlockN + w * kWarpKeys;
        float mx[32][2], alpha[32][2], m_use[32][2];
        for (int lane = 0; lane < 32; ++lane) {
          mx[lane][0] = mx[lane][1] = kNegInf;
          for (int nt = 0; nt < 2; ++nt)
            for (int v = 0; v < 4; ++v) {
              const Coord co = mma_c(lane, v);
              const int r = row0 + co.row;
              const int64_t j = key0 + nt * 8 + co.col;
              if (variant) {
                const PackedRow pr = packed_row(r < rows ? r : 0, hk, G);
                const RowBounds rb = row_bounds(pr.t, Lk, Tq, sq.lo, key_end, cs.causal, cs.wl, cs.wr);
                const int64_t lim = r >= rows ? -1 : rb.hi;
                const float slope_log2 =
                    cs.alibi_kind ? static_cast<float>(cs.alibi[b * alibi_stride_b + pr.hq] * static_cast<float>(kLog2e))
                                  : 0.f;
                const bool ok = j >= rb.lo && j <= lim;
                s[nt][lane][v] = ok ? variant_score(s[nt][lane][v], scale_log2, softcap_in, softcap_out, slope_log2,
                                                    rb.diag - j)
                                    : kNegInf;
              } else {
                const int64_t lim = r >= rows ? -1 : (cs.causal ? r / G + Lk - Tq : key_end - 1);
                const bool ok = j < key_end && j <= lim;
                s[nt][lane][v] = ok ? s[nt][lane][v] * scale_log2 : kNegInf;
              }
              mx[lane][v >> 1] = std::fmax(mx[lane][v >> 1], s[nt][lane][v]);
            }
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int rr = 0; rr < 2; ++rr) {  // __shfl_xor 1 and 2: the max over the quad
            float q4 = kNegInf;
            for (int o = 0; o < 4; ++o) q4 = std::fmax(q4, mx[(lane & ~3) | o][rr]);
            const float m_new = std::fmax(m_run[w][lane][rr], q4);
            m_use[lane][rr] = m_new == kNegInf ? 0.f : m_new;
            alpha[lane][rr] = std::exp2(m_run[w][lane][rr] - m_use[lane][rr]);
            m_run[w][lane][rr] = m_new;
            l_run[w][lane][rr] *= alpha[lane][rr];
          }
        float pa[32][4][2];
        for (int lane = 0; lane < 32; ++lane) {
          for (int nt = 0; nt < 2; ++nt)
            for (int v = 0; v < 4; ++v) {
              s[nt][lane][v] = std::exp2(s[nt][lane][v] - m_use[lane][v >> 1]);
              l_run[w][lane][v >> 1] += s[nt][lane][v];
            }
          for (int r = 0; r < 4; ++r)
            for (int e = 0; e < 2; ++e) pa[lane][r][e] = s[p_tile_of_a(r)][lane][p_value_of_a(r, e)];
        }
        for (int nt = 0; nt < NT; ++nt) {
          float c[32][4], bv[32][2][2];
          for (int lane = 0; lane < 32; ++lane) {
            for (int v = 0; v < 4; ++v)
              c[lane][v] = acc[((size_t(w) * 32 + lane) * NT + nt) * 4 + v] * alpha[lane][v >> 1];
            for (int r = 0; r < 2; ++r)
              for (int e = 0; e < 2; ++e) {
                const Coord co = mma_b(lane, r, e);
                bv[lane][r][e] = vs[(w * kWarpKeys + co.row) * D_MAX + nt * 8 + co.col];
              }
          }
          if (nt * 8 < D) warp_mma(c, pa, bv);
          for (int lane = 0; lane < 32; ++lane)
            for (int v = 0; v < 4; ++v) acc[((size_t(w) * 32 + lane) * NT + nt) * 4 + v] = c[lane][v];
        }
      }
    }
    // Epilogue: quad-sum l, scatter O / m / l per warp, merge.
    std::vector<float> o_s(size_t(kWarps) * kRows * D_MAX), m_s(kWarps * kRows), l_s(kWarps * kRows);
    for (int w = 0; w < kWarps; ++w)
      for (int lane = 0; lane < 32; ++lane) {
        for (int nt = 0; nt < NT; ++nt)
          for (int v = 0; v < 4; ++v) {
            const Coord co = mma_c(lane, v);
            o_s[(size_t(w) * kRows + co.row) * D_MAX + nt * 8 + co.col] = acc[((size_t(w) * 32 + lane) * NT + nt) * 4 + v];
          }
        if ((lane & 3) == 0)
          for (int rr = 0; rr < 2; ++rr) {
            float sum = 0.f;
            for (int o = 0; o < 4; ++o) sum += l_run[w][lane + o][rr];
            m_s[w * kRows + (lane >> 2) + 8 * rr] = m_run[w][lane][rr];
            l_s[w * kRows + (lane >> 2) + 8 * rr] = sum;
          }
      }
    const int rows_here = rows - row0 < kRows ? rows - row0 : kRows;
    const int64_t lse_rows = n_rows;
    for (int r = 0; r < rows_here; ++r) {
      float m_tot = kNegInf;
      for (int w = 0; w < kWarps; ++w) m_tot = std::fmax(m_tot, m_s[w * kRows + r]);
      const PackedRow pr = packed_row(row0 + r, hk, G);
      const int64_t lse_row = (int64_t(b) * Hq + pr.hq) * Tq + pr.t;
      float l_tot = 0.f;
      if (m_tot != kNegInf)
        for (int w = 0; w < kWarps; ++w) l_tot += l_s[w * kRows + r] * std::exp2(m_s[w * kRows + r] - m_tot);
      const float inv = l_tot > 0.f ? 1.f / l_tot : 0.f;
      for (int d = 0; d < D; ++d) {
        float o = 0.f;
        if (m_tot != kNegInf)
          for (int w = 0; w < kWarps; ++w)
            o += o_s[(size_t(w) * kRows + r) * D_MAX + d] * std::exp2(m_s[w * kRows + r] - m_tot);
        if (ns == 1) {
          out[((size_t(b) * Tq + pr.t) * Hq + pr.hq) * D + d] = o * inv;
        } else {
          o_part[(size_t(bi.split) * lse_rows + lse_row) * D + d] = o * inv;
        }
      }
      const float v = l_tot > 0.f ? (m_tot + std::log2(l_tot)) * 0.69314718055994531f : kNegInf;
      if (ns == 1) {
        lse[lse_row] = v;
      } else {
        lse_part[size_t(bi.split) * lse_rows + lse_row] = v;
      }
    }
  }
  if (ns > 1) {  // combine_splits_kernel: active splits only
    for (int64_t row = 0; row < n_rows; ++row) {
      const int t = int(row % Tq);
      const int64_t bh = row / Tq;
      const int hq = int(bh % Hq);
      const int b = int(bh / Hq);
      const Seq sq = seq_work(b);
      const int na = active_splits(sq.Lk - sq.begin, ns, kSplitAlign);
      float m = kNegInf, sum = 0.f;
      for (int s = 0; s < na; ++s) {
        if (std::isnan(lse_part[size_t(s) * n_rows + row])) fail("combine reads a partial no block wrote");
        m = std::fmax(m, lse_part[size_t(s) * n_rows + row]);
      }
      for (int s = 0; s < na; ++s) sum += m == kNegInf ? 0.f : std::exp(lse_part[size_t(s) * n_rows + row] - m);
      lse[row] = sum > 0.f ? m + std::log(sum) : kNegInf;
      for (int d = 0; d < D; ++d) {
        float a = 0.f;
        for (int s = 0; s < na; ++s) {
          const float w = m == kNegInf ? 0.f : std::exp(lse_part[size_t(s) * n_rows + row] - m);
          a += w * o_part[(size_t(s) * n_rows + row) * D + d];
        }
        out[((size_t(b) * Tq + t) * Hq + hq) * D + d] = sum > 0.f ? a / sum : 0.f;
      }
    }
  }
  FILE* g = std::fopen(out_path, "wb");
  if (!g) fail("cannot open output");
  std::fwrite(&ns, sizeof ns, 1, g);
  std::fwrite(&tiles_computed, sizeof tiles_computed, 1, g);
  std::fwrite(out.data(), sizeof(float), out.size(), g);
  std::fwrite(lse.data(), sizeof(float), lse.size(), g);
  std::fwrite(cs.kc.data(), sizeof(float), cs.kc.size(), g);
  std::fwrite(cs.vc.data(), sizeof(float), cs.vc.size(), g);
  std::fclose(g);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "selftest") == 0) return selftest();
  if (argc == 3) return run(argv[1], argv[2]);
  std::fprintf(stderr, "usage: %s selftest | IN OUT\n", argv[0]);
  return 2;
}
