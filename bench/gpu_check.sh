#!/usr/bin/env bash
# The GPU checks, as one prepared command for a session that is lent a CUDA machine (the
# `device` tool: 15 minutes of device time per task, one command at most 10 minutes). Run
# from the repository root there:
#     bash bench/gpu_check.sh            # logs and result tables under $OUT (or ./gpu-out)
# It uses that machine's own python3 and torch (no venv: nothing can be installed there),
# builds the extension in place for sm_90, then, each step time-boxed so one slow step still
# leaves the others' results:
#   1. the CUDA-device tests (every test parametrised by `device` runs on cuda too) and the
#      Triton kernels compiled for the GPU instead of interpreted;
#   2. the masked-ops benchmark, CPU then GPU section (targets: fused masked linear fwd+bwd <= 1.10x
#      dense, gate sampling >= 80% of copy bandwidth).
# Commit what comes back under bench/results/ with the device named (the tables name it).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
py=python3

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

timeout 240 $py setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -30 "$OUT/build.log"; exit 1; }

# CUDA-parametrised tests only (-k cuda), then the Triton suite on the GPU (no interpreter).
timeout 180 $py -m pytest python_tests -q -x -m "not cmake and not triton" -k cuda 2>&1 | tee "$OUT/tests-cuda.log" | tail -5
timeout 150 $py -m pytest python_tests -q -m triton 2>&1 | tee "$OUT/tests-triton.log" | tail -5

timeout 120 $py bench/bench_masked_ops.py --repeats 9 2>&1 | tee "$OUT/masked_ops.log" | tail -25
cp bench/results/masked_ops.md "$OUT/" 2>/dev/null
exit 0
