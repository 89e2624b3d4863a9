"""Builds sparsekern and its compiled part, `sparsekern._C`.

CUDAExtension whenever nvcc / CUDA_HOME exist, even with no GPU on the machine (the CUDA
sources must compile in CI, which has none); CppExtension otherwise. Environment:
  SPARSEKERN_CPU_ONLY=1    skip the CUDA sources even when nvcc is there
  TORCH_CUDA_ARCH_LIST     defaults to "8.0;9.0" (A100, H100) when no GPU is detected
  MAX_JOBS                 parallel compile jobs for ninja
Install with `pip install --no-build-isolation -e .` so the build sees the pinned torch.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit root. torch guesses it from the nvcc on PATH; here that can be a
    wrapper script in /usr/local/bin, giving /usr/local (no lib64/libcudart). Resolve
    the real nvcc instead, so the link finds libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


def _extensions():
    _find_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    import torch
    from torch.utils import cpp_extension

    cpu_only = os.environ.get("SPARSEKERN_CPU_ONLY", "0") == "1"
    with_cuda = (not cpu_only) and cpp_extension.CUDA_HOME is not None
    if with_cuda and not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    # Relative paths: setuptools refuses absolute source paths.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: ATen's at::parallel_for is inline OpenMP; without the flag it compiles to
    # a serial loop (measured: 2 threads ran exactly as fast as 1).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DSPARSEKERN_PYTHON_MODULE"]
    kwargs = dict(
        name="sparsekern._C",
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # The cu13 wheels ship the CUDA library headers (cusparse.h, cublas_v2.h, which
        # ATen/cuda headers include) in site-packages, not in the system toolkit.
        wheel_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        if os.path.isdir(wheel_include):
            kwargs["include_dirs"].append(os.path.abspath(wheel_include))
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs
        )
    else:
        ext = cpp_extension.CppExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="sparsekern",
    version="0.1.0",
    description="Fused Triton / C++ / CUDA kernels and pruning methods for training sparse networks",
    packages=find_packages(include=["sparsekern", "sparsekern.*"]),
    python_requires=">=3.10",
    install_requires=["torch==2.14.1", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    entry_points={"console_scripts": ["sparsekern=sparsekern.cli:main"]},
)
