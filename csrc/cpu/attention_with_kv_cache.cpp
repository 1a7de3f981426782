// The CPU kernel of pytorch_mqa::attention_with_kv_cache (the plain op: no variant, no serving
// argument), registered as the op's CPU kernel. It appends the new k/v rows in place and attends
// the caches in memory order: a task covers one sequence and a range of its cache rows, reads each
// row's Hkv * D values of K (then of V) once for every query head, and keeps an online softmax
// (m, l, acc) per query row in blocks of rows. A short batch splits the rows over several tasks
// (flash-decoding); the partial results are merged through their maxima at the end. Rows past a
// sequence's length are never read.
//
// Any call this kernel does not cover (another backend, a variant or serving argument, strided
// head dims, many query rows per KV head, ...) goes, with its arguments untouched, to
// pytorch_mqa::attention_with_kv_cache_general: the same schema, defined in Python
// (pytorch_mqa/ops/library.py), running the Python dispatch of the op.
// Narrow ATen headers instead of <ATen/ATen.h> / <torch/extension.h>: half the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu_math.h"

namespace pytorch_mqa {
namespace cpu {
namespace {

// Tq * G above this goes to the general op (flash-based path). Up to 64 rows are vectors of
// scores per key, computed 32 rows at a time (4 keys x 4 ymm accumulators: in registers with
// AVX-512VL's 32).
constexpr int64_t kMaxRowsPerKv = 64;
// Multiply-adds below which a call runs on the calling thread (a few ms of work): on a loaded
// machine every parallel region can wait milliseconds for a descheduled thread (measured on 2
// shared cores: MHA B=1 L=4096 took 1.9 ms on one thread, 6-10 ms split over two).
constexpr int64_t kInlineWork = 1 << 20;
constexpr int64_t kRowGroup = 8;  // cache rows whose heads are read together (see attend_rows)

// Argument positions in the schema (pytorch_mqa/ops/library.py).
enum Arg : int {
  Q, K_CACHE, V_CACHE, K, V, SEQLENS, CAUSAL, SCALE, BACKEND, WIN_L, WIN_R, SOFTCAP, ALIBI,
  BLOCK_TABLE, BATCH_IDX, LEFTPAD, ROT_COS, ROT_SIN, ROT_INTERLEAVED, N_ARGS
};

struct Problem {
  int64_t B, Tq, Hq, Hkv, D, G, R;  // R = Tq * G query rows per KV head
  int64_t new_rows;                 // Tq with new k/v, else 0
  bool causal;
  float scale;
  const int32_t* lens;
};

struct Task {
  int64_t b, j0, j1;
};

template <typename T>
struct Cache {
  const T* p;
  int64_t sb, ss, sh;  // strides of (B, S, Hkv) in elements; D is unit-stride
  const T* row(int64_t b, int64_t j, int64_t h) const { return p + b * sb + j * ss + h * sh; }
};

// One task: rows [j0, j1) of sequence b, all query rows. m, l: (Hkv * R); acc: (Hkv * R, D).
// qf: this sequence's scaled query rows, fp32 (Hkv * R, D), row h * R + t * G + g; qt: the same
// transposed per head, (Hkv, D, RP), for RP > 0.
template <typename T, int64_t DC, int64_t RP>
void attend_rows(const Problem& pb, const Cache<T>& kc, const Cache<T>& vc, const float* qf, const float* qt,
                 int64_t b, int64_t j0, int64_t j1, float* m, float* l, float* acc) {
  const int64_t D = DC > 0 ? DC : pb.D;
  const int64_t HR = pb.Hkv * pb.R;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < HR; ++i) m[i] = ninf, l[i] = 0.0f;
  std::fill(acc, acc + HR * D, 0.0f);
  if (j1 <= j0) return;
  std::vector<float> s(HR * kBlock);
  constexpr bool kFloat = std::is_same<T, float>::value;
  // Low precision: the block's rows converted to fp32 once, (kBlock, Hkv, D).
  std::vector<float> conv(kFloat ? 0 : kBlock * pb.Hkv * D);
  std::vector<const float*> rows(kBlock * pb.Hkv);  // (Hkv, kBlock) row pointers
  auto gather = [&](const Cache<T>& c, int64_t jb, int64_t nb) {
    for (int64_t jj = 0; jj < nb; ++jj)
      for (int64_t h = 0; h < pb.Hkv; ++h) {
        if constexpr (kFloat) {
          rows[h * kBlock + jj] = c.row(b, jb + jj, h);
        } else {
          float* dst = conv.data() + (jj * pb.Hkv + h) * D;
          load_row(c.row(b, jb + jj, h), dst, D);
          rows[h * kBlock + jj] = dst;
        }
      }
  };
  const int64_t n_keys = pb.lens[b] + pb.new_rows;
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int64_t nb = std::min(kBlock, j1 - jb);
    // Scores of every query row against the block's keys (each cache row read once, in order).
    // In memory order: kRowGroup rows at a time, all heads of each row, so the block's rows are
    // read as a few contiguous streams instead of one strided stream per head.
    gather(kc, jb, nb);
    for (int64_t jg = 0; jg < nb; jg += kRowGroup) {
      const int64_t ng = std::min(kRowGroup, nb - jg);
      for (int64_t h = 0; h < pb.Hkv; ++h)
        scores<DC, RP>(rows.data() + h * kBlock + jg, ng, qf + h * pb.R * D, qt + (RP ? h * D * RP : 0), pb.R, D,
                       s.data() + h * pb.R * kBlock + jg);
    }
    if (pb.causal && pb.Tq > 1) {
      // Row t sees keys j < n_keys - Tq + t + 1 (bottom-right); mask the rest of the block.
      for (int64_t h = 0; h < pb.Hkv; ++h)
        for (int64_t r = 0; r < pb.R; ++r) {
          const int64_t t = r / pb.G;
          const int64_t lim = n_keys - pb.Tq + t + 1;
          float* sr = s.data() + (h * pb.R + r) * kBlock;
          for (int64_t jj = std::max<int64_t>(0, lim - jb); jj < nb; ++jj) sr[jj] = ninf;
        }
    }
    // Online softmax: new maxima, rescale, probabilities in place of the scores.
    for (int64_t i = 0; i < HR; ++i) {
      float* sr = s.data() + i * kBlock;
      float bm = ninf;
      for (int64_t jj = 0; jj < nb; ++jj) bm = sr[jj] > bm ? sr[jj] : bm;
      if (bm == ninf) {  // nothing visible in this block (causal); a NaN score reaches acc below
        bool nan = false;
        for (int64_t jj = 0; jj < nb; ++jj) nan |= sr[jj] != sr[jj];
        if (!nan) {
          std::fill(sr, sr + nb, 0.0f);
          continue;
        }
      }
      const float mn = std::max(m[i], bm);
      const float alpha = m[i] == ninf ? 0.0f : exp_approx(m[i] - mn);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t jj = 0; jj < nb; ++jj) {
        const float p = exp_approx(sr[jj] - mn);
        sr[jj] = p;
        sum += p;
      }
      l[i] = l[i] * alpha + sum;
      m[i] = mn;
      if (alpha != 1.0f) {
        float* a = acc + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    // acc += P V (each cache row of V read once, in order).
    gather(vc, jb, nb);
    for (int64_t jg = 0; jg < nb; jg += kRowGroup) {
      const int64_t ng = std::min(kRowGroup, nb - jg);
      for (int64_t h = 0; h < pb.Hkv; ++h)
        accumulate<DC>(rows.data() + h * kBlock + jg, ng, s.data() + h * pb.R * kBlock + jg, pb.R, D,
                       acc + h * pb.R * D);
    }
  }
}

template <typename T>
void append_rows(const Problem& pb, const at::Tensor& cache, const at::Tensor& src) {
  T* dst = cache.data_ptr<T>();
  const T* in = src.data_ptr<T>();
  const int64_t csb = cache.stride(0), css = cache.stride(1), csh = cache.stride(2);
  const int64_t ib = src.stride(0), it = src.stride(1), ih = src.stride(2);
  for (int64_t b = 0; b < pb.B; ++b)
    for (int64_t t = 0; t < pb.Tq; ++t)
      for (int64_t h = 0; h < pb.Hkv; ++h)
        std::memcpy(dst + b * csb + (pb.lens[b] + t) * css + h * csh, in + b * ib + t * it + h * ih,
                    pb.D * sizeof(T));
}

template <typename T, int64_t DC, int64_t RP>
std::tuple<at::Tensor, at::Tensor> run(const Problem& pb, const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache) {
  const int64_t B = pb.B, Tq = pb.Tq, Hq = pb.Hq, Hkv = pb.Hkv, D = pb.D, G = pb.G, R = pb.R;
  const int64_t HR = Hkv * R;
  // The query rows, scaled, fp32, laid out per sequence as (Hkv, Tq, G, D).
  std::vector<float> qf(B * HR * D);
  {
    const T* qp = q.data_ptr<T>();
    const int64_t qb = q.stride(0), qt = q.stride(1), qh = q.stride(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < Tq; ++t)
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const T* src = qp + b * qb + t * qt + hq * qh;
          float* dst = qf.data() + ((b * Hkv + hq / G) * R + t * G + hq % G) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]) * pb.scale;
        }
  }
  // Transposed per head for the vectorised score kernel: (B, Hkv, D, RP), rows past R zero.
  std::vector<float> qt(RP > 0 ? B * Hkv * D * RP : 0, 0.0f);
  if constexpr (RP > 0) {
    for (int64_t bh = 0; bh < B * Hkv; ++bh)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) qt[(bh * D + d) * RP + r] = qf[(bh * R + r) * D + d];
  }
  // Tasks: every sequence's visible rows in chunks; short batches split finer.
  int64_t rows_total = 0, rows_max = 0;
  for (int64_t b = 0; b < B; ++b) {
    rows_total += pb.lens[b] + pb.new_rows;
    rows_max = std::max<int64_t>(rows_max, pb.lens[b] + pb.new_rows);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t work = rows_total * HR * D;  // multiply-adds of the scores
  const bool inline_run = threads <= 1 || work < kInlineWork || at::in_parallel_region();
  int64_t chunk = std::max<int64_t>(rows_max, 1);
  if (!inline_run) {
    const int64_t min_rows = std::max<int64_t>(kBlock, (kInlineWork / 16) / std::max<int64_t>(HR * D, 1));
    const int64_t want = (rows_total + 4 * threads - 1) / (4 * threads);
    chunk = std::max<int64_t>(min_rows, want);
    chunk = (chunk + kBlock - 1) / kBlock * kBlock;
  }
  std::vector<Task> tasks;
  std::vector<int64_t> first(B + 1);
  for (int64_t b = 0; b < B; ++b) {
    first[b] = static_cast<int64_t>(tasks.size());
    const int64_t n = pb.lens[b] + pb.new_rows;
    if (n == 0) continue;
    // Causal with Tq > 1: rows past the last query's limit are not visible to any row.
    for (int64_t j = 0; j < n; j += chunk) tasks.push_back({b, j, std::min(n, j + chunk)});
  }
  first[B] = static_cast<int64_t>(tasks.size());
  const int64_t nt = first[B];
  std::vector<float> part(std::max<int64_t>(nt, 1) * HR * (D + 2));
  float* pm = part.data();
  float* pl = pm + nt * HR;
  float* pa = pl + nt * HR;
  const Cache<T> kc{k_cache.data_ptr<T>(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const Cache<T> vc{v_cache.data_ptr<T>(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Task& tk = tasks[i];
      attend_rows<T, DC, RP>(pb, kc, vc, qf.data() + tk.b * HR * D, qt.data() + (RP ? tk.b * Hkv * D * RP : 0), tk.b,
                             tk.j0, tk.j1, pm + i * HR, pl + i * HR, pa + i * HR * D);
    }
  };
  if (inline_run || nt <= 1) {
    body(0, nt);
  } else {
    at::parallel_for(0, nt, 1, body);
  }
  // Merge the partial results of each sequence; rows that saw no key: zeros, lse = -inf.
  at::Tensor out = at::empty({B, Tq, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> o(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = r / G, hq = h * G + r % G, i = h * R + r;
        float mx = ninf;
        for (int64_t k = first[b]; k < first[b + 1]; ++k) mx = std::max(mx, pm[k * HR + i]);
        float den = 0.0f;
        std::fill(o.begin(), o.end(), 0.0f);
        if (mx != ninf) {
          for (int64_t k = first[b]; k < first[b + 1]; ++k) {
            const float w = std::exp(pm[k * HR + i] - mx);
            den += w * pl[k * HR + i];
            axpy(w, pa + (k * HR + i) * D, o.data(), D);
          }
        } else {
          // Every split saw nothing (or NaN): a NaN partial sum still comes back as NaN.
          for (int64_t k = first[b]; k < first[b + 1]; ++k) den += pl[k * HR + i] != pl[k * HR + i] ? NAN : 0.0f;
        }
        T* dst = op + ((b * Tq + t) * Hq + hq) * D;
        float* lrow = lp + (b * Hq + hq) * Tq + t;
        if (den == 0.0f) {
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(0.0f);
          *lrow = ninf;
        } else {
          const float inv = 1.0f / den;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
          *lrow = mx + std::log(den);
        }
      }
  return {out, lse};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> run_dtype(const Problem& pb, const at::Tensor& q, const at::Tensor& kc,
                                             const at::Tensor& vc) {
  // Query rows per KV head: a vector of 8, 16, 32 or 64 from 4 on (GQA / MQA), else one dot per score.
  // D is a compile-time constant (64, 128) for float32 only: fewer instantiations, half the build.
  if constexpr (!std::is_same<T, float>::value) {
    if (pb.R > 16) return pb.R <= 32 ? run<T, 0, 32>(pb, q, kc, vc) : run<T, 0, 64>(pb, q, kc, vc);
    if (pb.R >= 4) return pb.R <= 8 ? run<T, 0, 8>(pb, q, kc, vc) : run<T, 0, 16>(pb, q, kc, vc);
    return run<T, 0, 0>(pb, q, kc, vc);
  } else {
    if (pb.R > 32) {
      if (pb.D == 64) return run<T, 64, 64>(pb, q, kc, vc);
      if (pb.D == 128) return run<T, 128, 64>(pb, q, kc, vc);
      return run<T, 0, 64>(pb, q, kc, vc);
    }
    if (pb.R > 16) {
      if (pb.D == 64) return run<T, 64, 32>(pb, q, kc, vc);
      if (pb.D == 128) return run<T, 128, 32>(pb, q, kc, vc);
      return run<T, 0, 32>(pb, q, kc, vc);
    }
    if (pb.R >= 4) {
      if (pb.R <= 8) {
        if (pb.D == 64) return run<T, 64, 8>(pb, q, kc, vc);
        if (pb.D == 128) return run<T, 128, 8>(pb, q, kc, vc);
        return run<T, 0, 8>(pb, q, kc, vc);
      }
      if (pb.D == 64) return run<T, 64, 16>(pb, q, kc, vc);
      if (pb.D == 128) return run<T, 128, 16>(pb, q, kc, vc);
      return run<T, 0, 16>(pb, q, kc, vc);
    }
    if (pb.D == 64) return run<T, 64, 0>(pb, q, kc, vc);
    if (pb.D == 128) return run<T, 128, 0>(pb, q, kc, vc);
    return run<T, 0, 0>(pb, q, kc, vc);
  }
}

bool plain_cpu_tensor(const c10::IValue& v, at::ScalarType dtype, int64_t dim) {
  if (!v.isTensor()) return false;
  const at::Tensor& t = v.toTensor();
  return t.device().is_cpu() && t.layout() == at::kStrided && t.scalar_type() == dtype && t.dim() == dim &&
         !t.is_conj() && !t.is_neg() && (t.numel() == 0 || t.stride(-1) == 1);
}

// Whether the C++ kernel covers this call; fills the problem (lengths excluded).
bool covered(const torch::jit::Stack& st, size_t base, Problem& pb) {
  auto arg = [&](int i) -> const c10::IValue& { return st[base + i]; };
  if (!arg(BACKEND).isString() || arg(BACKEND).toStringRef() != "reference") return false;
  if (arg(WIN_L).toInt() != -1 || arg(WIN_R).toInt() != -1 || arg(SOFTCAP).toDouble() != 0.0) return false;
  for (int i : {ALIBI, BLOCK_TABLE, BATCH_IDX, LEFTPAD, ROT_COS, ROT_SIN})
    if (!arg(i).isNone()) return false;
  if (!arg(Q).isTensor()) return false;
  const at::Tensor& q = arg(Q).toTensor();
  const at::ScalarType dt = q.scalar_type();
  if (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16) return false;
  if (!plain_cpu_tensor(arg(Q), dt, 4) || !plain_cpu_tensor(arg(K_CACHE), dt, 4) ||
      !plain_cpu_tensor(arg(V_CACHE), dt, 4))
    return false;
  const at::Tensor& kc = arg(K_CACHE).toTensor();
  const at::Tensor& vc = arg(V_CACHE).toTensor();
  pb.B = q.size(0), pb.Tq = q.size(1), pb.Hq = q.size(2), pb.D = q.size(3), pb.Hkv = kc.size(2);
  if (pb.B == 0 || pb.Tq == 0 || pb.D == 0 || pb.Hkv == 0 || pb.Hq % pb.Hkv != 0) return false;
  if (kc.sizes() != vc.sizes() || kc.size(0) != pb.B || kc.size(3) != pb.D) return false;
  if (q.stride(-1) != 1 || kc.stride(-1) != 1 || vc.stride(-1) != 1) return false;
  pb.G = pb.Hq / pb.Hkv;
  pb.R = pb.Tq * pb.G;
  if (pb.R > kMaxRowsPerKv) return false;
  const bool has_k = !arg(K).isNone(), has_v = !arg(V).isNone();
  if (has_k != has_v) return false;
  if (has_k) {
    if (!plain_cpu_tensor(arg(K), dt, 4) || !plain_cpu_tensor(arg(V), dt, 4)) return false;
    const std::vector<int64_t> want{pb.B, pb.Tq, pb.Hkv, pb.D};
    if (arg(K).toTensor().sizes() != want || arg(V).toTensor().sizes() != want) return false;
  }
  pb.new_rows = has_k ? pb.Tq : 0;
  if (!plain_cpu_tensor(arg(SEQLENS), at::kInt, 1) || arg(SEQLENS).toTensor().size(0) != pb.B) return false;
  pb.causal = arg(CAUSAL).toBool();
  pb.scale = static_cast<float>(arg(SCALE).toDouble());
  return true;
}

// DESIGN §4's capacity check, worded as pytorch_mqa.ops.validation.check_cache_capacity.
void check_capacity(const int32_t* lens, int64_t B, int64_t S, int64_t new_rows) {
  int64_t lo = 0, hi = 0;
  for (int64_t b = 1; b < B; ++b) {
    if (lens[b] < lens[lo]) lo = b;
    if (lens[b] > lens[hi]) hi = b;
  }
  TORCH_CHECK_VALUE(lens[lo] >= 0, "cache_seqlens: expected values >= 0, got ", lens[lo], " for sequence ", lo);
  TORCH_CHECK_VALUE(lens[hi] + new_rows <= S, "cache_seqlens: expected cache_seqlens[b] + Tq <= S = ", S,
                    " (cache capacity), got cache_seqlens[", hi, "] = ", lens[hi], " with Tq = ", new_rows,
                    " new rows");
}

void forward_to_general(torch::jit::Stack* stack) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pytorch_mqa::attention_with_kv_cache_general", "");
  op.callBoxed(stack);
}

void attention_with_kv_cache_cpu(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const size_t base = stack->size() - N_ARGS;
  Problem pb{};
  if (!covered(*stack, base, pb)) {
    forward_to_general(stack);
    return;
  }
  auto& st = *stack;
  at::Tensor q = st[base + Q].toTensor();
  at::Tensor kc = st[base + K_CACHE].toTensor();
  at::Tensor vc = st[base + V_CACHE].toTensor();
  at::Tensor seqlens = st[base + SEQLENS].toTensor().contiguous();
  pb.lens = seqlens.data_ptr<int32_t>();
  check_capacity(pb.lens, pb.B, kc.size(1), pb.new_rows);  // before anything is written
  std::tuple<at::Tensor, at::Tensor> res;
  auto go = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (pb.new_rows) {
      append_rows<scalar_t>(pb, kc, st[base + K].toTensor());
      append_rows<scalar_t>(pb, vc, st[base + V].toTensor());
      // The writes go through pointers: bump the caches' version counters as an in-place op does.
      kc.unsafeGetTensorImpl()->bump_version();
      vc.unsafeGetTensorImpl()->bump_version();
    }
    res = run_dtype<scalar_t>(pb, q, kc, vc);
  };
  switch (q.scalar_type()) {
    case at::kFloat: go(float{}); break;
    case at::kHalf: go(c10::Half{}); break;
    default: go(c10::BFloat16{}); break;
  }
  torch::jit::drop(st, N_ARGS);
  torch::jit::push(st, std::get<0>(res), std::get<1>(res));
}

}  // namespace
}  // namespace cpu
}  // namespace pytorch_mqa

TORCH_LIBRARY_IMPL(pytorch_mqa, CPU, m) {
  m.impl("attention_with_kv_cache",
         torch::CppFunction::makeFromBoxedFunction<&pytorch_mqa::cpu::attention_with_kv_cache_cpu>());
}
