"""CMakeLists.txt configures and builds csrc/ as a LibTorch library (CPU), and a C++
program linked against it gets the same threshold as torch.kthvalue."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cmake
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_and_example_runs(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ)
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DSPARSEKERN_CUDA=OFF",
        f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    out = subprocess.run(configure, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    out = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (build / "libsparsekern.so").exists()

    run_env = dict(env, LD_LIBRARY_PATH=os.pathsep.join([str(Path(torch.__file__).parent / "lib"), str(build)]))
    out = subprocess.run([str(build / "threshold_example")], capture_output=True, text=True, env=run_env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("threshold ")
