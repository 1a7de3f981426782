// Host emulation of the tensor-core decode kernel (csrc/decode_mma.cuh), built with g++ by
// tests/kernels/test_csrc_emulation.py. It runs the kernel's block / warp / lane structure on the
// CPU with the index helpers of csrc/decode_index.h: the grid fold, live-length splits, the new-row
// write, the cp.async stage ring (with checks that a stage is never overwritten before it is
// consumed, nor read before it is loaded), the mma.sync m16n8k16 fragments of every lane (the
// products are formed only from what each lane's fragment registers hold), the quad-shuffle
// online softmax, the warp merge, the partial writes and the combine. Values stay in fp32.
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
  int B, Tq, S, Hq, Hkv, D, has_new, causal, sms;
  float scale;
  std::vector<int32_t> seqlens;
  std::vector<float> q, kc, vc, kn, vn;
};

float read_all(FILE* f, void* dst, size_t bytes) {
  if (std::fread(dst, 1, bytes, f) != bytes) fail("short input");
  return 0.f;
}

int run(const char* in_path, const char* out_path) {
  FILE* f = std::fopen(in_path, "rb");
  if (!f) fail("cannot open input");
  Case cs;
  int hdr[9];
  read_all(f, hdr, sizeof hdr);
  cs.B = hdr[0], cs.Tq = hdr[1], cs.S = hdr[2], cs.Hq = hdr[3], cs.Hkv = hdr[4], cs.D = hdr[5];
  cs.has_new = hdr[6], cs.causal = hdr[7], cs.sms = hdr[8];
  read_all(f, &cs.scale, sizeof(float));
  const int B = cs.B, Tq = cs.Tq, S = cs.S, Hq = cs.Hq, Hkv = cs.Hkv, D = cs.D, G = Hq / Hkv;
  cs.seqlens.resize(B);
  read_all(f, cs.seqlens.data(), B * sizeof(int32_t));
  auto rd = [&](std::vector<float>& v, size_t n) { v.resize(n); read_all(f, v.data(), n * sizeof(float)); };
  rd(cs.q, size_t(B) * Tq * Hq * D);
  rd(cs.kc, size_t(B) * S * Hkv * D);
  rd(cs.vc, size_t(B) * S * Hkv * D);
  if (cs.has_new) {
    rd(cs.kn, size_t(B) * Tq * Hkv * D);
    rd(cs.vn, size_t(B) * Tq * Hkv * D);
  }
  std::fclose(f);

  const int D_MAX = D <= 64 ? 64 : (D <= 128 ? 128 : 256);
  const int STAGES = D_MAX <= 128 ? 3 : 2;
  const int rows = G * Tq;
  const int row_chunks = static_cast<int>(ceil_div(rows, kRows));
  const int ns = choose_splits(int64_t(B) * Hkv * row_chunks, S, kSplitAlign, cs.sms, kWaves, kMaxSplits);
  const int64_t n_rows = int64_t(B) * Hq * Tq;
  std::vector<float> o_part(size_t(ns) * n_rows * D, NAN), lse_part(size_t(ns) * n_rows, NAN);
  std::vector<float> out(size_t(B) * Tq * Hq * D, NAN), lse(n_rows, NAN);
  auto kc_at = [&](std::vector<float>& c, int b, int64_t j, int h, int d) -> float& {
    return c[((size_t(b) * S + j) * Hkv + h) * D + d];
  };
  auto kn_at = [&](std::vector<float>& c, int b, int64_t t, int h, int d) -> float& {
    return c[((size_t(b) * Tq + t) * Hkv + h) * D + d];
  };

  const int64_t grid = int64_t(B) * Hkv * row_chunks * ns;
  for (int64_t bid = 0; bid < grid; ++bid) {
    const BlockIndex bi = block_index(bid, row_chunks, ns);
    const int b = int(bi.bh / Hkv), hk = int(bi.bh % Hkv);
    const int64_t L = cs.seqlens[b];
    const int64_t Lk = live_keys(L, cs.has_new ? Tq : 0, S);
    const int64_t L_cache = cs.has_new ? live_keys(L, 0, S) : Lk;
    if (bi.split >= active_splits(Lk, ns, kSplitAlign)) continue;
    const KeyRange kr = split_range(bi.split, Lk, ns, kSplitAlign);
    const int row0 = bi.chunk * kRows;
    if (cs.has_new && bi.chunk == 0) {
      for (int64_t j = kr.begin > L_cache ? kr.begin : L_cache; j < kr.end; ++j) {
        if (j < 0 || j >= S || j - L < 0 || j - L >= Tq) fail("new-row write outside [0, S) or [0, Tq)");
        for (int d = 0; d < D; ++d) {
          kc_at(cs.kc, b, j, hk, d) = kn_at(cs.kn, b, j - L, hk, d);
          kc_at(cs.vc, b, j, hk, d) = kn_at(cs.vn, b, j - L, hk, d);
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
    int64_t key_end = kr.end;
    if (cs.causal) {
      const int last = (row0 + kRows < rows ? row0 + kRows : rows) - 1;
      const int64_t lim = last / G + Lk - Tq + 1;
      key_end = key_end < lim ? key_end : lim;
    }
    const int64_t key_begin = kr.begin;
    const int n_tiles = key_end > key_begin ? int(ceil_div(key_end - key_begin, kBlockN)) : 0;
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
        for (int n = 0; n < kBlockN; ++n)
          for (int d = 0; d < D_MAX; ++d) {
            const int64_t j = key_begin + i * kBlockN + n;
            float val = 0.f;
            if (j < key_end && d < D) {
              if (j >= L_cache) {
                val = kn_at(is_v ? cs.vn : cs.kn, b, j - L, hk, d);
              } else {
                val = kc_at(is_v ? cs.vc : cs.kc, b, j, hk, d);
              }
            }
            stage[((size_t(st) * 2 + is_v) * kBlockN + n) * D_MAX + d] = val;
          }
    };
    for (int s = 0; s < STAGES - 1; ++s)
      if (s < n_tiles) load_tile(s);

    const int NT = D_MAX / 8;
    // Per warp, per lane state.
    std::vector<float> acc(size_t(kWarps) * 32 * NT * 4, 0.f);
    float m_run[kWarps][32][2], l_run[kWarps][32][2];
    for (int w = 0; w < kWarps; ++w)
      for (int l = 0; l < 32; ++l) m_run[w][l][0] = m_run[w][l][1] = kNegInf, l_run[w][l][0] = l_run[w][l][1] = 0.f;
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
              const int64_t lim = r >= rows ? -1 : (cs.causal ? r / G + Lk - Tq : key_end - 1);
              const bool ok = j < key_end && j <= lim;
              s[nt][lane][v] = ok ? s[nt][lane][v] * cs.scale * 1.4426950408889634f : kNegInf;
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
      const int64_t Lk = live_keys(cs.seqlens[b], cs.has_new ? Tq : 0, S);
      const int na = active_splits(Lk, ns, kSplitAlign);
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
