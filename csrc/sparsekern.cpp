// Every C++ op's schema, in one place. Kernels register against these names in
// csrc/cpu/<op>_cpu.cpp and csrc/cuda/<op>_cuda.cu; fakes and autograd live in
// sparsekern/ops/.
#include <torch/library.h>

TORCH_LIBRARY(sparsekern, m) {
  // The n_prune-th smallest |x| (1-based) over all elements of all tensors, as a 0-dim
  // float32 tensor on their device; 0.0 when n_prune == 0; NaN when any value is NaN/Inf.
  m.def("magnitude_threshold(Tensor[] tensors, int n_prune) -> Tensor");
  // Keep-masks (True = keep) with exactly n_prune False in total: |x| below the threshold
  // pruned, above kept, ties at it pruned in ascending (tensor, flat index) order.
  // Also returns the threshold (same contract as magnitude_threshold).
  m.def("magnitude_masks(Tensor[] tensors, int n_prune) -> (Tensor[], Tensor)");
  // Fills float32 `out` with the Philox4x32-10 uniform stream of (seed, offset) over its
  // flat indices (the hard-concrete noise; CPU kernel only, CUDA draws it inside Triton).
  m.def("philox_uniform_(Tensor(a!) out, int seed, Tensor offset) -> ()");
  // w ⊙ g(mask) for a mask kind of sparsekern/ops/mask_math.py, and its backward
  // (grad_w, grad_mask; grad_mask empty unless mask_grad and the kind is learnable): the
  // CPU kernels of the masked ops (csrc/cpu/mask_apply_cpu.cpp; CUDA uses Triton).
  m.def("mask_apply(Tensor weight, Tensor mask, str kind, float beta, float scale) -> Tensor");
  m.def("mask_apply_backward(Tensor grad, Tensor weight, Tensor mask, str kind, float beta, float scale, bool mask_grad) -> (Tensor, Tensor)");
  // weights[i] *= keeps[i] (bool) in place, for every i: keeps binary-masked weights
  // exactly zero (a list: the methods zero every layer after each step in one call).
  m.def("zero_masked_(Tensor(a!)[] weights, Tensor[] keeps) -> ()");
  // What w ⊙ keep is for a bool keep (0-dim int64): 2 if keep prunes nothing, 1 if every
  // pruned weight is exactly zero (w ⊙ keep == w bit for bit), else 0.
  m.def("binary_prune_state(Tensor weight, Tensor keep) -> Tensor");
  // t itself (an alias) whose gradient is G ⊙ keep.
  m.def("binary_grad_mask(Tensor(a) weight, Tensor keep) -> Tensor(a)");
  // w ⊙ keep for a layer that uses it and lets it go (eager CPU): by binary_prune_state,
  // the weight itself (2), the weight aliased with gradient G ⊙ keep (1), or a new
  // w ⊙ keep (0). Like aten::contiguous, the result may or may not alias the weight.
  m.def("binary_masked_weight(Tensor(a) weight, Tensor keep) -> Tensor(a)");
  // Continuous Sparsification's L1 penalty Σ scale·σ(β·s) (a 0-dim tensor of scores'
  // dtype) and its backward grad·scale·β·σ(1 − σ); CPU kernels (CUDA uses Triton).
  m.def("sigmoid_mask_l1(Tensor scores, float beta, float scale) -> Tensor");
  m.def("sigmoid_mask_l1_backward(Tensor grad, Tensor scores, float beta, float scale) -> Tensor");
  // (w ⊙ g, Σ g) for the sigmoid and relaxed kinds from one pass (Σ g: 0-dim float32, the
  // gate's L1 norm, CS's and the concave L1 penalty) and its backward (grad_w, grad_mask)
  // from the gradients of both outputs; CPU kernels, eager only (csrc/README.md).
  m.def("mask_apply_l1(Tensor weight, Tensor mask, str kind, float beta, float scale) -> (Tensor, Tensor)");
  m.def("mask_apply_l1_backward(Tensor grad, Tensor grad_l1, Tensor weight, Tensor mask, str kind, float beta, float scale) -> (Tensor, Tensor)");
  // The hard-concrete gates' CPU kernels (float32/float16/bfloat16; CUDA runs the Triton
  // kernels of sparsekern::hard_concrete_sample): z in log_alpha's dtype and the expected
  // L0, group_size * sum sigmoid(log_alpha - beta log(-gamma/zeta)), as a 0-dim float32
  // tensor, from one pass; the backward regenerates the noise from (seed, offset).
  m.def(
      "hard_concrete_sample_fused(Tensor log_alpha, int seed, Tensor offset, int group_size, float beta, "
      "float gamma, float zeta, bool training) -> (Tensor, Tensor)");
  m.def(
      "hard_concrete_sample_fused_backward(Tensor grad_z, Tensor grad_l0, Tensor log_alpha, int seed, "
      "Tensor offset, int group_size, float beta, float gamma, float zeta, bool training) -> Tensor");
  // The same for a weight under unstructured gates (log_alpha of weight's shape): (w z,
  // expected L0) and, backward, (grad_w, grad_log_alpha); z is never stored: regenerated,
  // or read back from w_eff (the forward's output) where given, float32 and recoverable.
  m.def(
      "hard_concrete_masked_weight_fused(Tensor weight, Tensor log_alpha, int seed, Tensor offset, float beta, "
      "float gamma, float zeta, bool training) -> (Tensor, Tensor)");
  m.def(
      "hard_concrete_masked_weight_fused_backward(Tensor grad, Tensor grad_l0, Tensor weight, Tensor log_alpha, "
      "int seed, Tensor offset, float beta, float gamma, float zeta, bool training, Tensor? w_eff=None) -> (Tensor, Tensor)");
}
