// pytorch_mqa::decode_linear(x, weight, bias): y = x @ weight.T + bias for ONE row x (a decode
// step at batch 1), weight (out, in) as nn.Linear stores it. Eight output rows per inner loop share
// each load of x; the (out) rows are split over threads only above a size where that pays. Inputs
// that are not one contiguous float32 row (or a weight that is not contiguous float32) go to
// at::linear. The schema is defined in Python (pytorch_mqa/ops/cpu_ext.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace pytorch_mqa {
namespace cpu {
namespace {

constexpr int64_t kParallelWork = 1 << 19;  // multiply-adds above which the rows are split over threads

void rows_8(const float* __restrict w, const float* __restrict x, int64_t in, float* y) {
  const float *w0 = w, *w1 = w + in, *w2 = w + 2 * in, *w3 = w + 3 * in;
  const float *w4 = w + 4 * in, *w5 = w + 5 * in, *w6 = w + 6 * in, *w7 = w + 7 * in;
  float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
  for (int64_t i = 0; i < in; ++i) {
    const float xi = x[i];
    a0 += w0[i] * xi;
    a1 += w1[i] * xi;
    a2 += w2[i] * xi;
    a3 += w3[i] * xi;
    a4 += w4[i] * xi;
    a5 += w5[i] * xi;
    a6 += w6[i] * xi;
    a7 += w7[i] * xi;
  }
  y[0] = a0, y[1] = a1, y[2] = a2, y[3] = a3, y[4] = a4, y[5] = a5, y[6] = a6, y[7] = a7;
}

float row_1(const float* __restrict w, const float* __restrict x, int64_t in) {
  float a = 0;
#pragma omp simd reduction(+ : a)
  for (int64_t i = 0; i < in; ++i) a += w[i] * x[i];
  return a;
}

void rows(const float* w, const float* x, const float* bias, float* y, int64_t in, int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + 8 <= end; o += 8) rows_8(w + o * in, x, in, y + o);
  for (; o < end; ++o) y[o] = row_1(w + o * in, x, in);
  if (bias != nullptr)
    for (o = begin; o < end; ++o) y[o] += bias[o];
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool ok = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  x.dim() >= 1 && x.numel() == weight.size(1) && x.is_contiguous() && weight.is_contiguous() &&
                  !x.requires_grad() && !weight.requires_grad() &&
                  (!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                                         bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                                         !bias->requires_grad()));
  if (!ok) return at::linear(x, weight, bias);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_f;
  at::Tensor y = at::empty(shape, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || out_f * in_f < kParallelWork || at::in_parallel_region() || out_f < 16) {
    rows(w, xp, bp, yp, in_f, 0, out_f);
    return y;
  }
  // Whole groups of 8 rows per thread.
  const int64_t groups = (out_f + 7) / 8;
  at::parallel_for(0, groups, (groups + threads - 1) / threads, [&](int64_t g0, int64_t g1) {
    rows(w, xp, bp, yp, in_f, g0 * 8, std::min(out_f, g1 * 8));
  });
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace pytorch_mqa

TORCH_LIBRARY_IMPL(pytorch_mqa, CPU, m) {
  m.impl("decode_linear", &pytorch_mqa::cpu::decode_linear);
}
