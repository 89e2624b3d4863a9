"""The hard-concrete and sigmoid-L1 Triton kernels compile to sm_90 cubins (no GPU needed):
the CUDA path of hard_concrete_sample / hard_concrete_masked_weight / sigmoid_mask_l1 builds,
for every dtype and flag combination the launchers use."""
import pytest

from masked_helpers import compile_for_sm90

pytest.importorskip("triton")

HC_SCALARS = {"n": "i64", "seed": "i64", "offset_ptr": "*i64", "beta": "fp32", "gamma": "fp32", "zeta": "fp32"}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", ["*fp32", "*bf16", "*fp16", "*fp64"])
def test_hard_concrete_kernels(dtype, training, masked):
    from sparsekern.kernels import hard_concrete as hc

    fp64 = dtype == "*fp64"
    acc = "*fp64" if fp64 else "*fp32"
    flags = dict(MASKED=masked, TRAINING=training, FP64=fp64, MUL_FP64=fp64, BLOCK=hc.BLOCK)
    compile_for_sm90(hc._sample_kernel, dict(HC_SCALARS, log_alpha_ptr=dtype, weight_ptr=dtype, out_ptr=dtype,
                                             l0_partial_ptr=acc), flags)
    compile_for_sm90(hc._backward_kernel, dict(HC_SCALARS, grad_out_ptr=dtype, grad_l0_ptr=acc, log_alpha_ptr=dtype,
                                               weight_ptr=dtype, grad_ptr=dtype, grad_w_ptr=dtype), flags)


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16", "*fp16", "*fp64"])
def test_sigmoid_l1_kernels(dtype):
    from sparsekern.kernels import mask_l1

    fp64 = dtype == "*fp64"
    acc = "*fp64" if fp64 else "*fp32"
    flags = dict(FP64=fp64, BLOCK=mask_l1.BLOCK)
    scalars = {"n": "i64", "beta": "fp32", "scale": "fp32"}
    compile_for_sm90(mask_l1._forward_kernel, dict(scalars, scores_ptr=dtype, partial_ptr=acc), flags)
    compile_for_sm90(mask_l1._backward_kernel, dict(scalars, grad_ptr=acc, scores_ptr=dtype, out_ptr=dtype), flags)
