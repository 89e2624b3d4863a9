// How a LibTorch user calls sparsekern's ops: through the dispatcher, by name.
// Prints the threshold and exits non-zero unless it equals torch.kthvalue over the
// concatenation (the op's contract).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>

int main() {
  torch::manual_seed(0);
  std::vector<at::Tensor> weights = {torch::randn({64, 3, 3, 3}), torch::randn({10, 512}), torch::randn({7})};
  int64_t numel = 0;
  for (const auto& w : weights) numel += w.numel();
  const int64_t n_prune = std::llround(0.9 * static_cast<double>(numel));

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("sparsekern::magnitude_threshold", "")
                .typed<at::Tensor(at::TensorList, int64_t)>();
  const at::Tensor threshold = op.call(weights, n_prune);

  std::vector<at::Tensor> flat;
  for (const auto& w : weights) flat.push_back(w.abs().flatten());
  const at::Tensor expected = std::get<0>(torch::kthvalue(torch::cat(flat), n_prune));
  std::cout << "threshold " << threshold.item<float>() << " kthvalue " << expected.item<float>() << "\n";
  return torch::equal(threshold, expected) ? 0 : 1;
}
