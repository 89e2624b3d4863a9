// Autograd in C++ for the CPU kernels the modules call in eager mode:
// sparsekern::mask_apply (w_eff = w ⊙ g; SparseConv2d, SparseLinear),
// sparsekern::hard_concrete_sample_fused (the L0 gates z and expected L0) and
// sparsekern::hard_concrete_masked_weight_fused (w z under unstructured gates, z unstored)
// and sparsekern::sigmoid_mask_l1 (Continuous Sparsification's penalty); and the eager-only
// sparsekern::mask_apply_l1 (w ⊙ g with the gate's L1 norm, for CS and concave) and
// binary helpers binary_grad_mask / binary_masked_weight (csrc/README.md says why).
//
// Why in C++: the same forward and backward through torch.library's Python custom-op
// machinery (masked_conv2d_weight: argument defaults, a generated autograd.Function, a
// Python CPU kernel, each way) cost ~80 us more per layer and step than native `w * m`
// (16x16x3x3 weight: 112 vs 31 us), and in a ResNet-20 step, whose weights are small,
// that overhead was most of the binary mask's +14%. Under torch.compile the modules call
// masked_conv2d_weight / masked_linear, whose autograd is registered in Python
// (sparsekern/ops/masked_conv.py); both reach the same CPU kernels
// (csrc/cpu/mask_apply_cpu.cpp), so the math is written once. The same holds for the gates
// (sparsekern::hard_concrete_sample, csrc/cpu/hard_concrete_cpu.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

namespace sparsekern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_mask_apply(const at::Tensor& weight, const at::Tensor& mask, c10::string_view kind, double beta,
                           double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsekern::mask_apply", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double, double)>();
  return op.call(weight, mask, kind, beta, scale);
}

std::tuple<at::Tensor, at::Tensor> call_mask_apply_backward(const at::Tensor& grad, const at::Tensor& weight,
                                                            const at::Tensor& mask, c10::string_view kind,
                                                            double beta, double scale, bool mask_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsekern::mask_apply_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 c10::string_view, double, double, bool)>();
  return op.call(grad, weight, mask, kind, beta, scale, mask_grad);
}

bool learnable(const std::string& kind) {
  return kind == "sigmoid" || kind == "relaxed" || kind == "hard_concrete";
}

// backward(create_graph=True), i.e. a double backward (Hessian-vector products as in
// GraSP, penalties on weight gradients, MAML): autograd runs the backward with grad mode
// on and records it. The kernels the backwards call have no autograd of their own, so
// there the gradients are formed from differentiable ATen ops instead (the same math as
// reference.masked_weight's autograd). Before, a float32 double backward through a
// learnable mask silently dropped the second-order terms that pass through the mask:
// d|grad_w|^2/dw was off by 50-5700 on small layers.
bool double_backward() { return at::GradMode::is_enabled(); }

// (g, dg/dmask) for a float mask kind, differentiable: sigmoid scale·σ(β·s); relaxed and
// hard_concrete (a sampled z) the mask itself.
std::tuple<at::Tensor, at::Tensor> gate_and_slope(const at::Tensor& mask, const std::string& kind, double beta,
                                                  double scale) {
  if (kind == "sigmoid") {
    const at::Tensor s = mask.mul(beta).sigmoid();
    return {s.mul(scale), s.mul(s.neg().add(1.0)).mul(scale * beta)};
  }
  return {mask, at::ones_like(mask)};
}

class MaskApply : public torch::autograd::Function<MaskApply> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& mask,
                            const std::string& kind, double beta, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({weight, mask});  // inputs only: g is recomputed
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["scale"] = scale;
    return call_mask_apply(weight, mask, kind, beta, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor& mask = saved[1];
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    const bool need_w = ctx->needs_input_grad(0);
    const bool need_m = ctx->needs_input_grad(1) && learnable(kind);
    at::Tensor grad = grads[0];
    variable_list out(5);
    if (!grad.defined() || !(need_w || need_m)) return out;
    if (kind == "straight_through") {  // grad_w = G, no mask grad
      out[0] = grad;
      return out;
    }
    if (double_backward()) {
      const double beta = ctx->saved_data["beta"].toDouble(), scale = ctx->saved_data["scale"].toDouble();
      if (kind == "binary") {
        if (need_w) out[0] = grad.mul(mask);
        return out;
      }
      auto [g, slope] = gate_and_slope(mask, kind, beta, scale);
      if (need_w) out[0] = grad.mul(g);
      if (need_m) out[1] = grad.mul(weight).mul(slope).sum_to_size(mask.sizes());
      return out;
    }
    if (grad.strides() != weight.strides()) {  // e.g. a channels_last grad for a contiguous weight
      grad = at::empty_like(weight).copy_(grad);
    }
    auto [grad_w, grad_m] = call_mask_apply_backward(grad, weight, mask, kind, ctx->saved_data["beta"].toDouble(),
                                                     ctx->saved_data["scale"].toDouble(), need_m);
    if (need_w) out[0] = grad_w;
    if (need_m) out[1] = grad_m;
    return out;
  }
};

// The weight itself (custom_function turns the returned input into a view of it) with
// gradient G ⊙ keep. keep is saved, so autograd refuses a backward after it changed in
// place. Why not a Python hook on the weight doing the same: at batch 32, with the caches
// full of activations, each hook call cost ~40 us of interpreter time per layer and step
// (torch.profiler), 2-3% of ResNet-20's CPU step; this backward runs no Python.
void check_binary_grad_mask(const at::Tensor& weight, const at::Tensor& keep) {
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "binary_grad_mask: `keep` must be bool, got ",
                   keep.scalar_type());
  TORCH_CHECK_VALUE(keep.sizes() == weight.sizes(), "binary_grad_mask: `keep` must have weight's shape ",
                    weight.sizes(), ", got ", keep.sizes());
}

class BinaryGradMask : public torch::autograd::Function<BinaryGradMask> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& keep) {
    check_binary_grad_mask(weight, keep);
    ctx->save_for_backward({keep});
    return weight;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor keep = ctx->get_saved_variables()[0];
    variable_list out(2);
    at::Tensor grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return out;
    if (grad.scalar_type() != at::kFloat || !grad.device().is_cpu() || !keep.device().is_cpu()) {
      // mask_apply's kernel is CPU float32 only (a float64 weight's backward raised there).
      out[0] = at::mul(grad, keep);
      return out;
    }
    if (grad.strides() != keep.strides()) grad = at::empty_like(keep, grad.options()).copy_(grad);
    out[0] = call_mask_apply(grad, keep, "binary", 1.0, 1.0);
    return out;
  }
};

at::Tensor binary_grad_mask_autograd(const at::Tensor& weight, const at::Tensor& keep) {
  return BinaryGradMask::apply(weight, keep);
}

// Below autograd (no_grad aside, e.g. inference mode): just the alias.
at::Tensor binary_grad_mask_alias(const at::Tensor& weight, const at::Tensor& keep) {
  check_binary_grad_mask(weight, keep);
  return weight.alias();
}

// Whether the C++ binary kernels take (weight, keep): check_layout's conditions, as a test.
bool binary_cpp_layout(const at::Tensor& weight, const at::Tensor& keep) {
  return weight.scalar_type() == at::kFloat && weight.device().is_cpu() && keep.device().is_cpu() &&
         weight.strides() == keep.strides() && weight.is_non_overlapping_and_dense();
}

int64_t binary_prune_state(const at::Tensor& weight, const at::Tensor& keep) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsekern::binary_prune_state", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(weight, keep).item<int64_t>();
}

// A binary-masked layer's w ⊙ keep, decided here rather than in Python (the Python
// checks and the two op calls they chose between cost ~10 us per layer and step, with
// the caches full of activations more): the weight itself when keep prunes nothing, the
// weight with its gradient masked when every pruned weight is zero, else a new w ⊙ keep.
at::Tensor binary_masked_weight_autograd(const at::Tensor& weight, const at::Tensor& keep) {
  check_binary_grad_mask(weight, keep);
  if (!binary_cpp_layout(weight, keep)) return at::mul(weight, keep);  // with autograd: grad G ⊙ keep
  switch (binary_prune_state(weight, keep)) {
    case 2:
      return weight;
    case 1:
      return BinaryGradMask::apply(weight, keep);
    default:
      return MaskApply::apply(weight, keep, "binary", 1.0, 1.0);
  }
}

// Below autograd (inference mode): the same values, no graph.
at::Tensor binary_masked_weight_values(const at::Tensor& weight, const at::Tensor& keep) {
  check_binary_grad_mask(weight, keep);
  if (!binary_cpp_layout(weight, keep)) return at::mul(weight, keep);
  return binary_prune_state(weight, keep) > 0 ? weight.alias() : call_mask_apply(weight, keep, "binary", 1.0, 1.0);
}

// The gates' backward regenerates the noise inside its kernel; a differentiable version
// would need the noise as a tensor. Refused rather than silently first-order.
constexpr const char* kNoHardConcreteDoubleBackward =
    "sparsekern: the hard-concrete gates have no double backward (a backward with create_graph=True that reaches "
    "log alpha, or the weight of an unstructured L0 layer): second-order terms through these gates are not "
    "supported";

// The constants a hard-concrete backward needs to regenerate the noise from (seed, offset).
// The offset tensor itself goes through save_for_backward: its version counter then makes
// an in-place change between forward and backward an error (kept by reference, a changed
// offset silently regenerated other noise and gave other gradients).
void save_gate_constants(AutogradContext* ctx, int64_t seed, double beta, double gamma, double zeta, bool training) {
  ctx->saved_data["seed"] = seed;
  ctx->saved_data["beta"] = beta;
  ctx->saved_data["gamma"] = gamma;
  ctx->saved_data["zeta"] = zeta;
  ctx->saved_data["training"] = training;
}

using HcSample = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, const at::Tensor&, int64_t, double,
                                                     double, double, bool);
using HcBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                              int64_t, double, double, double, bool);

// (z, expected L0) from log α; the backward regenerates the noise from (seed, offset), so
// only log α is saved (never u or z).
class HardConcreteSample : public torch::autograd::Function<HardConcreteSample> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& log_alpha, int64_t seed, const at::Tensor& offset,
                               int64_t group_size, double beta, double gamma, double zeta, bool training) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::hard_concrete_sample_fused", "")
                         .typed<HcSample>();
    ctx->save_for_backward({log_alpha, offset});
    save_gate_constants(ctx, seed, beta, gamma, zeta, training);
    ctx->saved_data["group_size"] = group_size;
    auto [z, l0] = op.call(log_alpha, seed, offset, group_size, beta, gamma, zeta, training);
    return {z, l0};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::hard_concrete_sample_fused_backward", "")
                         .typed<HcBackward>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& log_alpha = saved[0];
    variable_list out(8);
    if (!ctx->needs_input_grad(0)) return out;
    TORCH_CHECK(!double_backward(), kNoHardConcreteDoubleBackward);
    // An output that did not reach the loss has no gradient: it contributes zero.
    at::Tensor grad_z = grads[0].defined() ? grads[0] : at::zeros_like(log_alpha);
    at::Tensor grad_l0 = grads[1].defined() ? grads[1] : at::zeros({}, log_alpha.options().dtype(at::kFloat));
    auto& d = ctx->saved_data;
    out[0] = op.call(grad_z, grad_l0, log_alpha, d["seed"].toInt(), saved[1], d["group_size"].toInt(),
                     d["beta"].toDouble(), d["gamma"].toDouble(), d["zeta"].toDouble(), d["training"].toBool());
    return out;
  }
};

using HcMasked = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                                     double, double, double, bool);
using HcMaskedBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, int64_t, const at::Tensor&, double,
                                                             double, double, bool, const std::optional<at::Tensor>&);

// (w z, expected L0) under unstructured gates; saves weight and log α (parameters, kept
// anyway) and its output w z, which the conv or linear it feeds saves for its own backward
// anyway: the float32 backward reads z back from it (csrc/cpu/hard_concrete_cpu.cpp,
// backward_recovered_body), so no weight-sized tensor is added.
class HardConcreteMaskedWeight : public torch::autograd::Function<HardConcreteMaskedWeight> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& log_alpha,
                               int64_t seed, const at::Tensor& offset, double beta, double gamma, double zeta,
                               bool training) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::hard_concrete_masked_weight_fused", "")
                         .typed<HcMasked>();
    save_gate_constants(ctx, seed, beta, gamma, zeta, training);
    auto [w_eff, l0] = op.call(weight, log_alpha, seed, offset, beta, gamma, zeta, training);
    ctx->save_for_backward({weight, log_alpha, w_eff, offset});
    return {w_eff, l0};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::hard_concrete_masked_weight_fused_backward", "")
                         .typed<HcMaskedBackward>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor& log_alpha = saved[1];
    variable_list out(8);
    if (!(ctx->needs_input_grad(0) || ctx->needs_input_grad(1))) return out;
    TORCH_CHECK(!double_backward(), kNoHardConcreteDoubleBackward);
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(weight);
    at::Tensor grad_l0 = grads[1].defined() ? grads[1] : at::zeros({}, log_alpha.options().dtype(at::kFloat));
    auto& d = ctx->saved_data;
    auto [grad_w, grad_la] = op.call(grad, grad_l0, weight, log_alpha, d["seed"].toInt(), saved[3],
                                     d["beta"].toDouble(), d["gamma"].toDouble(), d["zeta"].toDouble(),
                                     d["training"].toBool(), saved[2]);
    if (ctx->needs_input_grad(0)) out[0] = grad_w;
    if (ctx->needs_input_grad(1)) out[1] = grad_la;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> hard_concrete_masked_weight_autograd(const at::Tensor& weight,
                                                                        const at::Tensor& log_alpha, int64_t seed,
                                                                        const at::Tensor& offset, double beta, double gamma,
                                                                        double zeta, bool training) {
  auto out = HardConcreteMaskedWeight::apply(weight, log_alpha, seed, offset, beta, gamma, zeta, training);
  return {out[0], out[1]};
}

// CS's L1 penalty Σ scale·σ(β·s): saves the scores only (a parameter), recomputes σ.
class SigmoidMaskL1 : public torch::autograd::Function<SigmoidMaskL1> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& scores, double beta, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::sigmoid_mask_l1", "")
                         .typed<at::Tensor(const at::Tensor&, double, double)>();
    ctx->save_for_backward({scores});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["scale"] = scale;
    return op.call(scores, beta, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::sigmoid_mask_l1_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, double)>();
    variable_list out(3);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    if (double_backward()) {
      auto [g, slope] = gate_and_slope(ctx->get_saved_variables()[0], "sigmoid", ctx->saved_data["beta"].toDouble(),
                                       ctx->saved_data["scale"].toDouble());
      out[0] = grads[0].mul(slope);
      return out;
    }
    out[0] = op.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["beta"].toDouble(),
                     ctx->saved_data["scale"].toDouble());
    return out;
  }
};

at::Tensor sigmoid_mask_l1_autograd(const at::Tensor& scores, double beta, double scale) {
  return SigmoidMaskL1::apply(scores, beta, scale);
}

// (w ⊙ g, Σ g) for the sigmoid and relaxed kinds: saves weight and mask (inputs), as MaskApply.
class MaskApplyL1 : public torch::autograd::Function<MaskApplyL1> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& mask,
                               const std::string& kind, double beta, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::mask_apply_l1", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   c10::string_view, double, double)>();
    ctx->save_for_backward({weight, mask});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["scale"] = scale;
    auto [w_eff, l1] = op.call(weight, mask, kind, beta, scale);
    return {w_eff, l1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparsekern::mask_apply_l1_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   c10::string_view, double, double)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor& mask = saved[1];
    variable_list out(5);
    if (!(ctx->needs_input_grad(0) || ctx->needs_input_grad(1))) return out;
    // An output that did not reach the loss has no gradient: it contributes zero.
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(weight);
    if (grad.strides() != weight.strides()) grad = at::empty_like(weight).copy_(grad);
    at::Tensor grad_l1 = grads[1].defined() ? grads[1] : at::zeros({}, weight.options());
    if (double_backward()) {  // both kinds' masks have the weight's shape
      auto [g, slope] = gate_and_slope(mask, ctx->saved_data["kind"].toStringRef(), ctx->saved_data["beta"].toDouble(),
                                       ctx->saved_data["scale"].toDouble());
      if (ctx->needs_input_grad(0)) out[0] = grad.mul(g);
      if (ctx->needs_input_grad(1)) out[1] = grad.mul(weight).add(grad_l1).mul(slope);
      return out;
    }
    auto [grad_w, grad_m] = op.call(grad, grad_l1, weight, mask, ctx->saved_data["kind"].toStringRef(),
                                    ctx->saved_data["beta"].toDouble(), ctx->saved_data["scale"].toDouble());
    if (ctx->needs_input_grad(0)) out[0] = grad_w;
    if (ctx->needs_input_grad(1)) out[1] = grad_m;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> mask_apply_l1_autograd(const at::Tensor& weight, const at::Tensor& mask,
                                                          c10::string_view kind, double beta, double scale) {
  auto out = MaskApplyL1::apply(weight, mask, std::string(kind), beta, scale);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> hard_concrete_sample_autograd(const at::Tensor& log_alpha, int64_t seed,
                                                                 const at::Tensor& offset, int64_t group_size, double beta,
                                                                 double gamma, double zeta, bool training) {
  auto out = HardConcreteSample::apply(log_alpha, seed, offset, group_size, beta, gamma, zeta, training);
  return {out[0], out[1]};
}

at::Tensor mask_apply_autograd(const at::Tensor& weight, const at::Tensor& mask, c10::string_view kind, double beta,
                               double scale) {
  return MaskApply::apply(weight, mask, std::string(kind), beta, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) {
  m.impl("mask_apply", &mask_apply_autograd);
  m.impl("hard_concrete_sample_fused", &hard_concrete_sample_autograd);
  m.impl("hard_concrete_masked_weight_fused", &hard_concrete_masked_weight_autograd);
  m.impl("sigmoid_mask_l1", &sigmoid_mask_l1_autograd);
  m.impl("mask_apply_l1", &mask_apply_l1_autograd);
  m.impl("binary_grad_mask", &binary_grad_mask_autograd);
  m.impl("binary_masked_weight", &binary_masked_weight_autograd);
}

TORCH_LIBRARY_IMPL(sparsekern, CompositeExplicitAutograd, m) {
  m.impl("binary_grad_mask", &binary_grad_mask_alias);
  m.impl("binary_masked_weight", &binary_masked_weight_values);
}

}  // namespace sparsekern
