// The CPU kernels of pytorch_mqa::attention, registered for its CPU and AutogradCPU dispatch keys,
// so that a CPU call, with or without a gradient, runs without entering Python.
//
// - CPU: the plain op (backend "reference", no variant, non-causal or Tq == Tk, non-empty) is
//   exactly PyTorch's fused CPU attention on (B, H, T, D) views of the (B, T, H, D) inputs (a
//   head dim that is not unit-stride is copied first, as the Python path does). Its output is laid out (B, T, H, D) and its lse (B, H, T) as a view of a (B, T, H)
//   buffer, the layouts the op's fake declares (pytorch_mqa/ops/library.py). Every other call
//   goes, with its arguments untouched, to pytorch_mqa::attention_general: the same schema,
//   defined in Python, running the op's Python dispatch (pytorch_mqa/ops/dispatch.py).
// - AutogradCPU: without a gradient to record, the call goes on to the keys below autograd (the
//   CPU kernel above, or a fake or functional tensor's handler under torch.compile). With one, and
//   backend "reference", AttentionCpuFunction records the backward: the op's own backward on CPU
//   (pytorch_mqa::attention_backward_cpu, which takes dLSE), or, where that backward is PyTorch's
//   fused backward kernel alone, that kernel called directly. Other backends go to
//   attention_general, whose autograd is registered in Python (the delta form of their backward).
//
// What "the fused backward alone" means is `pytorch_mqa.ops.cpu.fused_differentiable_ok`, whose
// C++ twin is `fused_backward_ok` below: change both together.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace pytorch_mqa {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Pair = std::tuple<Tensor, Tensor>;

// pytorch_mqa::attention's schema (and attention_general's), unboxed:
// (q, k, v, causal, scale, backend, window_left, window_right, softcap, alibi_slopes, dropout_p,
//  dropout_seed) -> (out, lse)
using AttentionSig = Pair(const Tensor&, const Tensor&, const Tensor&, bool, double, c10::string_view, int64_t,
                          int64_t, double, const OptTensor&, double, const OptTensor&);
// pytorch_mqa::attention_backward_cpu: (dout, q, k, v, out, lse, dlse, causal, scale, variants...)
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, const OptTensor&, bool, double,
                                                       int64_t, int64_t, double, const OptTensor&, double,
                                                       const OptTensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::TypedOperatorHandle<AttentionSig>& attention_op() {
  static const auto op = handle<AttentionSig>("pytorch_mqa::attention");
  return op;
}

const c10::TypedOperatorHandle<AttentionSig>& general_op() {
  static const auto op = handle<AttentionSig>("pytorch_mqa::attention_general");
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_cpu_op() {
  static const auto op = handle<BackwardSig>("pytorch_mqa::attention_backward_cpu");
  return op;
}

bool no_variants(int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes,
                 double dropout_p) {
  return window_left == -1 && window_right == -1 && softcap == 0.0 && !alibi_slopes.has_value() && dropout_p == 0.0;
}

bool kernel_dtype(const Tensor& x) {
  const auto dt = x.scalar_type();
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

// (B, T, H, D) -> (B, H, T, D), the fused kernel's view; copied only when D is not unit-stride
// (pytorch_mqa.ops.cpu._bhsd).
Tensor bhsd(const Tensor& x) {
  Tensor t = x.transpose(1, 2);
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// Whether the fused kernel alone computes this forward: the contract's bottom-right causal
// alignment is the kernel's top-left one only for Tq == Tk, and empty problems have their own
// result (zeros, lse = -inf). Shapes and dtypes were validated by the public function.
bool fused_forward_ok(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  if (!kernel_dtype(q) || k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type()) return false;
  if (q.numel() == 0 || k.size(1) == 0) return false;
  return !causal || q.size(1) == k.size(1);
}

// pytorch_mqa.ops.cpu.fused_differentiable_ok: whether this package's CPU backward is the fused
// backward kernel alone (no causal split, no K/V expansion over threads, no float32 sum of dK/dV
// over query heads; see pytorch_mqa.ops.cpu._expansion).
bool fused_backward_ok(const Tensor& q, const Tensor& k, bool causal) {
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), Tk = k.size(1), Hkv = k.size(2);
  if ((causal && Tq != Tk) || Tk == 0 || q.numel() == 0) return false;
  if (Hq == Hkv) return true;
  return q.scalar_type() == at::kFloat && B * Hkv >= at::get_num_threads();
}

Pair fused_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(bhsd(q), bhsd(k), bhsd(v), 0.0, causal,
                                                                    std::nullopt, scale);
  // The kernel allocates out as (B, Tq, Hq, D) and lse as (B, Tq, Hq) and returns (B, H, T) views.
  return {out.transpose(1, 2).contiguous(), lse};
}

Pair attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                   c10::string_view backend, int64_t window_left, int64_t window_right, double softcap,
                   const OptTensor& alibi_slopes, double dropout_p, const OptTensor& dropout_seed) {
  if (backend == "reference" && no_variants(window_left, window_right, softcap, alibi_slopes, dropout_p) &&
      fused_forward_ok(q, k, v, causal)) {
    return fused_forward(q, k, v, causal, scale);
  }
  return general_op().call(q, k, v, causal, scale, backend, window_left, window_right, softcap, alibi_slopes,
                           dropout_p, dropout_seed);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AttentionCpuFunction : public torch::autograd::Function<AttentionCpuFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                               double scale, int64_t window_left, int64_t window_right, double softcap,
                               const OptTensor& alibi_slopes, double dropout_p, const OptTensor& dropout_seed,
                               c10::DispatchKeySet ks) {
    ctx->set_materialize_grads(false);  // a gradient the loss does not use arrives undefined
    Tensor out, lse;
    {
      // The op itself below autograd: the CPU kernel, or under torch.compile the fake or
      // functional tensor's handler, which then records pytorch_mqa::attention in the graph.
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, lse) = attention_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, v, causal, scale,
                                                     "reference", window_left, window_right, softcap, alibi_slopes,
                                                     dropout_p, dropout_seed);
    }
    ctx->save_for_backward({q, k, v, out, lse});
    auto& d = ctx->saved_data;
    d["causal"] = causal;
    d["scale"] = scale;
    d["window_left"] = window_left;
    d["window_right"] = window_right;
    d["softcap"] = softcap;
    d["alibi_slopes"] = alibi_slopes;
    d["dropout_p"] = dropout_p;
    d["dropout_seed"] = dropout_seed;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    auto& d = ctx->saved_data;
    const bool causal = d["causal"].toBool();
    const double scale = d["scale"].toDouble();
    const int64_t window_left = d["window_left"].toInt(), window_right = d["window_right"].toInt();
    const double softcap = d["softcap"].toDouble(), dropout_p = d["dropout_p"].toDouble();
    const OptTensor alibi_slopes = d["alibi_slopes"].toOptional<Tensor>();
    const OptTensor dropout_seed = d["dropout_seed"].toOptional<Tensor>();
    const Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const Tensor& dlse = grads[1];
    Tensor dq, dk, dv;
    if (!dlse.defined() && no_variants(window_left, window_right, softcap, alibi_slopes, dropout_p) &&
        fused_backward_ok(q, k, causal) && !q.key_set().has(c10::DispatchKey::Python) &&
        !dout.key_set().has(c10::DispatchKey::Python)) {
      // The fused backward kernel alone (what attention_backward_cpu would call), given dout as
      // it comes (the kernel takes any strides of dout; of q, k, v, out only a unit-stride D); its
      // gradients are (B, H, T, D) views of (B, T, H, D) buffers.
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          dout.transpose(1, 2), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse, 0.0, causal, std::nullopt, scale);
      dq = dq.transpose(1, 2).contiguous();
      dk = dk.transpose(1, 2).contiguous();
      dv = dv.transpose(1, 2).contiguous();
    } else {
      const OptTensor dlse_opt = dlse.defined() ? OptTensor(dlse) : std::nullopt;
      std::tie(dq, dk, dv) = backward_cpu_op().call(dout, q, k, v, out, lse, dlse_opt, causal, scale, window_left,
                                                    window_right, softcap, alibi_slopes, dropout_p, dropout_seed);
    }
    // One gradient per forward argument: q, k, v, then none for the other nine.
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Pair attention_autograd_cpu(c10::DispatchKeySet ks, const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                            double scale, c10::string_view backend, int64_t window_left, int64_t window_right,
                            double softcap, const OptTensor& alibi_slopes, double dropout_p,
                            const OptTensor& dropout_seed) {
  const bool grad = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attention_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, v, causal, scale, backend,
                                      window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed);
  }
  if (backend != "reference") {
    return general_op().call(q, k, v, causal, scale, backend, window_left, window_right, softcap, alibi_slopes,
                             dropout_p, dropout_seed);
  }
  auto outs = AttentionCpuFunction::apply(q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes,
                                       dropout_p, dropout_seed, ks);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace cpu
}  // namespace pytorch_mqa

TORCH_LIBRARY_IMPL(pytorch_mqa, CPU, m) {
  m.impl("attention", TORCH_FN(pytorch_mqa::cpu::attention_cpu));
}

TORCH_LIBRARY_IMPL(pytorch_mqa, AutogradCPU, m) {
  m.impl("attention", TORCH_FN(pytorch_mqa::cpu::attention_autograd_cpu));
}
