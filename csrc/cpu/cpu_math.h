// Small vectorisable helpers shared by the CPU kernels (csrc/cpu/). Plain loops with
// `#pragma omp simd` (built with -fopenmp-simd -march=native): the compiler picks the host's
// vector width; no intrinsics needed, and the same code is the portable scalar path elsewhere.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace pytorch_mqa {
namespace cpu {

// exp(x) for float32, |relative error| < 2e-7 on the range used here (x <= 0 after the running
// max is subtracted), 0 for x < -87 (so exp(-inf) = 0) and NaN for NaN. Cephes' exp2f polynomial
// on [-1/2, 1/2]; branch-free so that loops of it vectorise.
static inline float exp_approx(float x) {
  const float lo = -87.0f;
  const bool under = x < lo;
  float xc = under ? lo : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float y = xc * 1.44269504088896341f;
  // Round to nearest by the 1.5 * 2^23 trick (no floorf call, so the loop vectorises); the
  // integer n is then in the low mantissa bits of t.
  const float magic = 12582912.0f;
  const float t = y + magic;
  const float n = t - magic;
  const float f = y - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t tb, mb;
  std::memcpy(&tb, &t, sizeof(float));
  std::memcpy(&mb, &magic, sizeof(float));
  const int32_t bits = (tb - mb + 127) * (1 << 23);
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  const float r = p * two_n;
  return under ? 0.0f : (x != x ? x : r);
}

static inline float to_float(float x) { return x; }
static inline float to_float(c10::Half x) { return static_cast<float>(x); }
static inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
static inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

constexpr int64_t kBlock = 32;  // cache rows per online-softmax step of the decode kernel

// Eight floats as one value (GCC/Clang vector extensions: the compiler maps them to the host's
// registers, AVX/AVX2/AVX-512 or SSE pairs, or to scalar code). Unaligned, may alias floats.
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
static inline void store8(float* p, v8 x) { *reinterpret_cast<v8*>(p) = x; }
static inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }
static inline float hsum8(v8 x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// Scores of R query rows against nb keys of one head: s[r * kBlock + jj] = q_r . k_jj.
// RP == 0: one dot product per score (few query rows per KV head, e.g. MHA), four keys at a
// time. RP == 8, 16, 32 or 64: the query rows are a vector (qt: (D, RP), rows past R zero), four
// keys at a time, no reductions, in passes of up to 32 rows.
template <int64_t DC, int64_t RP>
inline void scores(const float* const* krows, int64_t nb, const float* qh, const float* qt, int64_t R, int64_t D_,
                   float* s) {
  const int64_t D = DC > 0 ? DC : D_;
  if constexpr (RP == 0) {
    (void)qt;
    const int64_t D8 = D / 8 * 8;
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = qh + r * D;
      float* sr = s + r * kBlock;
      int64_t jj = 0;
      for (; jj + 4 <= nb; jj += 4) {
        const float *k0 = krows[jj], *k1 = krows[jj + 1], *k2 = krows[jj + 2], *k3 = krows[jj + 3];
        v8 a0 = splat8(0), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D8; d += 8) {
          const v8 x = load8(qr + d);
          a0 += x * load8(k0 + d);
          a1 += x * load8(k1 + d);
          a2 += x * load8(k2 + d);
          a3 += x * load8(k3 + d);
        }
        float t0 = hsum8(a0), t1 = hsum8(a1), t2 = hsum8(a2), t3 = hsum8(a3);
        for (int64_t d = D8; d < D; ++d) {
          t0 += qr[d] * k0[d], t1 += qr[d] * k1[d], t2 += qr[d] * k2[d], t3 += qr[d] * k3[d];
        }
        sr[jj] = t0, sr[jj + 1] = t1, sr[jj + 2] = t2, sr[jj + 3] = t3;
      }
      for (; jj < nb; ++jj) {
        const float* k0 = krows[jj];
        v8 a0 = splat8(0);
        for (int64_t d = 0; d < D8; d += 8) a0 += load8(qr + d) * load8(k0 + d);
        float t0 = hsum8(a0);
        for (int64_t d = D8; d < D; ++d) t0 += qr[d] * k0[d];
        sr[jj] = t0;
      }
    }
  } else {
    (void)qh;
    constexpr int64_t NV = RP / 8;           // vectors of 8 query rows
    constexpr int64_t CV = NV < 4 ? NV : 4;  // per pass: 4 keys x CV accumulators stay in registers
    for (int64_t c0 = 0; c0 < NV && 8 * c0 < R; c0 += CV) {
      const int64_t r0 = 8 * c0, r1 = std::min<int64_t>(R, 8 * (c0 + CV));
      const float* qc = qt + 8 * c0;
      int64_t jj = 0;
      for (; jj + 4 <= nb; jj += 4) {
        const float *k0 = krows[jj], *k1 = krows[jj + 1], *k2 = krows[jj + 2], *k3 = krows[jj + 3];
        v8 a0[CV], a1[CV], a2[CV], a3[CV];
        for (int64_t c = 0; c < CV; ++c) a0[c] = a1[c] = a2[c] = a3[c] = splat8(0);
        for (int64_t d = 0; d < D; ++d) {
          const v8 x0 = splat8(k0[d]), x1 = splat8(k1[d]), x2 = splat8(k2[d]), x3 = splat8(k3[d]);
          for (int64_t c = 0; c < CV; ++c) {
            const v8 qd = load8(qc + d * RP + 8 * c);
            a0[c] += qd * x0;
            a1[c] += qd * x1;
            a2[c] += qd * x2;
            a3[c] += qd * x3;
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = (r - r0) / 8, i = r % 8;
          s[r * kBlock + jj] = a0[c][i];
          s[r * kBlock + jj + 1] = a1[c][i];
          s[r * kBlock + jj + 2] = a2[c][i];
          s[r * kBlock + jj + 3] = a3[c][i];
        }
      }
      for (; jj < nb; ++jj) {
        const float* k0 = krows[jj];
        v8 a0[CV];
        for (int64_t c = 0; c < CV; ++c) a0[c] = splat8(0);
        for (int64_t d = 0; d < D; ++d) {
          const v8 x0 = splat8(k0[d]);
          for (int64_t c = 0; c < CV; ++c) a0[c] += load8(qc + d * RP + 8 * c) * x0;
        }
        for (int64_t r = r0; r < r1; ++r) s[r * kBlock + jj] = a0[(r - r0) / 8][r % 8];
      }
    }
  }
}

// acc_r += sum_jj p[r * kBlock + jj] * v_jj for the R query rows of one head. With D a
// compile-time multiple of 8, a row of the accumulator stays in registers over the block.
template <int64_t DC>
inline void accumulate(const float* const* vrows, int64_t nb, const float* p, int64_t R, int64_t D_, float* acc) {
  const int64_t D = DC > 0 ? DC : D_;
  int64_t r = 0;
  if constexpr (DC > 0 && DC % 8 == 0 && DC <= 64) {
    // Two rows at a time share each load of v.
    constexpr int64_t NV = DC / 8;
    for (; r + 2 <= R; r += 2) {
      const float *p0 = p + r * kBlock, *p1 = p0 + kBlock;
      float *r0 = acc + r * D, *r1 = r0 + D;
      v8 a[NV], b[NV];
#pragma GCC unroll 16
      for (int64_t c = 0; c < NV; ++c) a[c] = load8(r0 + 8 * c), b[c] = load8(r1 + 8 * c);
      for (int64_t jj = 0; jj < nb; ++jj) {
        const v8 w0 = splat8(p0[jj]), w1 = splat8(p1[jj]);
        const float* vr = vrows[jj];
#pragma GCC unroll 16
        for (int64_t c = 0; c < NV; ++c) {
          const v8 x = load8(vr + 8 * c);
          a[c] += w0 * x;
          b[c] += w1 * x;
        }
      }
#pragma GCC unroll 16
      for (int64_t c = 0; c < NV; ++c) store8(r0 + 8 * c, a[c]), store8(r1 + 8 * c, b[c]);
    }
  }
  for (; r < R; ++r) {
    const float* pr = p + r * kBlock;
    float* ar = acc + r * D;
    if constexpr (DC > 0 && DC % 8 == 0) {
      constexpr int64_t NV = DC / 8;
      v8 a[NV];
#pragma GCC unroll 16
      for (int64_t c = 0; c < NV; ++c) a[c] = load8(ar + 8 * c);
      for (int64_t jj = 0; jj < nb; ++jj) {
        const v8 w = splat8(pr[jj]);
        const float* vr = vrows[jj];
#pragma GCC unroll 16
        for (int64_t c = 0; c < NV; ++c) a[c] += w * load8(vr + 8 * c);
      }
#pragma GCC unroll 16
      for (int64_t c = 0; c < NV; ++c) store8(ar + 8 * c, a[c]);
    } else {
      for (int64_t jj = 0; jj < nb; ++jj) axpy(pr[jj], vrows[jj], ar, D);
    }
  }
}

}  // namespace cpu
}  // namespace pytorch_mqa
