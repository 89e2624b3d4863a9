"""Edge cases an audit of the ops found: a compiled caller passing a changing float (an
annealed β), a Linear with no inputs, a NaN DPF threshold, a keep-mask on another device."""
import re

import pytest
import torch

from sparsekern import ops


def test_compiled_ops_take_a_changing_float_without_a_graph_break():
    # The finite-float check called math.isfinite on dynamo's symbolic float: fullgraph failed.
    torch.manual_seed(0)
    x, w, s = torch.randn(8, 16), torch.randn(4, 16), torch.randn(4, 16)
    compiled = torch.compile(lambda beta: ops.masked_linear(x, w, None, s, kind="sigmoid", beta=beta), fullgraph=True)
    for beta in (1.0, 2.0, 3.5):
        torch.testing.assert_close(compiled(beta), ops.masked_linear(x, w, None, s, kind="sigmoid", beta=beta),
                                   rtol=1e-5, atol=1e-5)
    binary = torch.compile(lambda: ops.masked_linear(x, w, None, s > 0, kind="binary"), fullgraph=True, dynamic=True)
    torch.testing.assert_close(binary(), ops.masked_linear(x, w, None, s > 0, kind="binary"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["binary", "sigmoid", "relaxed"])
def test_masked_linear_with_no_inputs_is_the_bias(dtype, kind):
    x, w = torch.randn(4, 0, dtype=dtype), torch.randn(3, 0, dtype=dtype)
    mask = torch.ones(3, 0, dtype=torch.bool) if kind == "binary" else torch.rand(3, 0, dtype=dtype)
    bias = torch.randn(3, dtype=dtype)
    torch.testing.assert_close(ops.masked_linear(x, w, bias, mask, kind=kind), bias.expand(4, 3))


def test_dpf_mask_update_refuses_a_nan_threshold():
    with pytest.raises(ValueError, match="threshold"):
        ops.dpf_mask_update([torch.randn(5)], [torch.ones(5, dtype=torch.bool)], float("nan"))


def test_zero_masked_refuses_a_keep_on_another_device():
    w = torch.randn(3)
    before = w.clone()
    with pytest.raises(ValueError, match="keep"):
        ops.zero_masked_(w, torch.zeros(3, dtype=torch.bool, device="meta"))
    assert torch.equal(w, before)


# --- the torch.ops.sparsekern.* ops called directly ------------------------------------------

_B, _G, _Z = 2.0 / 3.0, -0.1, 1.1


def _raw_cases():
    """(op, arguments, the argument put on the meta device, its label): one per op that
    takes two or more tensors. The other arguments are CPU tensors."""
    w, keep, s, la = torch.randn(3, 4), torch.rand(3, 4) > 0.5, torch.randn(3, 4), torch.randn(5)
    x, b, w4 = torch.randn(2, 4), torch.randn(3), torch.randn(3, 2, 1, 1)
    off, one = torch.tensor(0), torch.tensor(0.5)
    M = lambda t: t.to("meta")  # noqa: E731
    hc = (_B, _G, _Z, True)
    return {
        "magnitude_threshold": (([la, M(la)], 2), "tensors[1]"),
        "magnitude_masks": (([la, M(la)], 2), "tensors[1]"),
        "philox_uniform_": ((torch.empty(3), 0, M(off)), "offset"),
        "mask_apply": ((w, M(s), "sigmoid", 1.0, 1.0), "mask"),
        "mask_apply_backward": ((s, w, M(s), "sigmoid", 1.0, 1.0, True), "mask"),
        "zero_masked_": (([w.clone()], [M(keep)]), "keeps[0]"),
        "binary_prune_state": ((w, M(keep)), "keep"),
        "sigmoid_mask_l1_backward": ((one, M(s), 1.0, 1.0), "scores"),
        "mask_apply_l1": ((w, M(s), "relaxed", 1.0, 1.0), "mask"),
        "mask_apply_l1_backward": ((s, one, w, M(s), "relaxed", 1.0, 1.0), "mask"),
        "hard_concrete_sample_fused": ((la, 0, M(off), 1, *hc), "offset"),
        "hard_concrete_sample_fused_backward": ((la, M(one), la, 0, off, 1, *hc), "grad_l0"),
        "hard_concrete_masked_weight_fused": ((la, M(la), 0, off, *hc), "log_alpha"),
        "hard_concrete_masked_weight_fused_backward": ((la, one, la, la, 0, off, *hc, M(la)), "w_eff"),
        "hard_concrete_sample": ((la, 0, M(off), 1, *hc), "offset"),
        "hard_concrete_sample_backward": ((la, one, la, 0, M(off), 1, *hc), "offset"),
        "hard_concrete_masked_weight": ((la, M(la), 0, off, *hc), "log_alpha"),
        "hard_concrete_masked_weight_backward": ((la, one, la, la, 0, M(off), *hc), "offset"),
        "masked_linear": ((x, w, b, M(keep), "binary", 1.0, 1.0), "mask"),
        "masked_linear_grad_input": ((torch.randn(2, 3), w, M(keep), "binary", 1.0, 1.0), "mask"),
        "masked_linear_grad_weight": ((torch.randn(2, 3), x, w, M(s), "sigmoid", 1.0, 1.0, True, True), "mask"),
        "masked_conv2d_weight": ((w4, M(torch.rand(3, 2, 1, 1)), "relaxed", 1.0, 1.0), "mask"),
        "masked_conv2d_weight_backward": ((w4, w4, M(torch.rand(3, 2, 1, 1)), "relaxed", 1.0, 1.0, True), "mask"),
        "sigmoid_mask_l1_op_backward": ((one, M(s), 1.0, 1.0), "scores"),
        "dpf_mask_update": (([la], [la > 0], M(torch.tensor(0.5))), "threshold"),
        "mask_flips": (([la > 0], [M(la > 0)]), "prev_masks[0]"),
    }


@pytest.mark.parametrize("name", sorted(_raw_cases()))
def test_raw_ops_refuse_a_meta_argument_beside_cpu_ones(name):
    # Any meta argument sends the call to the Meta kernel, the op's fake: with the other
    # arguments on the CPU it returned an uninitialised CPU tensor as the result (e.g.
    # binary_prune_state's "state" 94024749947941), silently.
    args, label = _raw_cases()[name]
    with pytest.raises(ValueError, match=re.escape(f"`{label}` must be on ") + ".* device cpu, got meta"):
        getattr(torch.ops.sparsekern, name)(*args)


MASKED_OPS = {
    "masked_linear": lambda d, m: (torch.randn(2, 4, dtype=d), torch.randn(3, 4, dtype=d), None, m),
    "masked_linear_grad_input": lambda d, m: (torch.randn(2, 3, dtype=d), torch.randn(3, 4, dtype=d), m),
    "masked_linear_grad_weight": lambda d, m: (torch.randn(2, 3, dtype=d), torch.randn(2, 4, dtype=d),
                                               torch.randn(3, 4, dtype=d), m),
    "masked_conv2d_weight": lambda d, m: (torch.randn(3, 4, 1, 1, dtype=d), m.reshape(3, 4, 1, 1)),
    "masked_conv2d_weight_backward": lambda d, m: (torch.randn(3, 4, 1, 1, dtype=d), torch.randn(3, 4, 1, 1, dtype=d),
                                                   m.reshape(3, 4, 1, 1)),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MASKED_OPS))
def test_raw_masked_ops_refuse_an_unknown_kind(name, dtype, device):
    # The Triton ops' CPU kernels and fakes took any string: "relaxd" ran as a float gate
    # wherever the C++ kernels (float32, which check it) did not take the call (float64
    # gave values; meta, shapes).
    args = MASKED_OPS[name](dtype, torch.rand(3, 4, dtype=dtype))
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    extra = (True, True) if name == "masked_linear_grad_weight" else (True,) if name.endswith("backward") else ()
    with pytest.raises(ValueError, match="`kind`"):
        getattr(torch.ops.sparsekern, name)(*args, "relaxd", 1.0, 1.0, *extra)
