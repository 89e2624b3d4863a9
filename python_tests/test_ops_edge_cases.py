"""Edge cases an audit of the ops found: a compiled caller passing a changing float (an
annealed β), a Linear with no inputs, a NaN DPF threshold, a keep-mask on another device."""
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
