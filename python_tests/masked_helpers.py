"""What the masked-op tests share: random masks per kind, and compiling a Triton kernel to
an sm_90 cubin without a GPU (proves the CUDA path builds)."""
import torch

from sparsekern.ops import mask_math


def make_mask(kind, shape, gen, mask_shape=None):
    shape = mask_shape or shape
    if kind in mask_math.BOOL_KINDS:
        return torch.rand(shape, generator=gen) > 0.4
    if kind == "sigmoid":
        return torch.randn(shape, generator=gen)
    m = torch.rand(shape, generator=gen)
    if kind == "hard_concrete":  # exact zeros and ones, as a clamped gate has
        m = torch.where(m < 0.2, 0.0, torch.where(m > 0.8, 1.0, m))
    return m


def compile_for_sm90(kernel, ptr_types, constexprs, num_warps=4, num_stages=3):
    """Compiles a @triton.jit kernel to a cubin for an H100 (no GPU needed), within the
    H100's 227 KiB of shared memory per block."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    scalar = lambda n: "fp32" if n in ("beta", "scale") else "i32"
    sig = {n: "constexpr" if n in constexprs else ptr_types.get(n, scalar(n)) for n in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 227 * 1024
    return compiled
