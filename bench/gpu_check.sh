#!/usr/bin/env bash
# The GPU checks, as one prepared command for a session that is lent a CUDA machine (the
# `device` tool: 15 minutes of device time per task, one command at most 10 minutes). Run
# from the repository root there:
#     bash bench/gpu_check.sh            # logs and result tables under $OUT (or ./gpu-out)
# It uses that machine's own python3 and torch (no venv: nothing can be installed there),
# builds the extension in place for sm_90 (CPU-only if the CUDA build fails, so the Triton
# kernels are still checked), then, each step time-boxed so one slow step still leaves the
# others' results:
#   1. side by side: the CUDA-device tests (every test parametrised by `device` runs on cuda
#      too), the Triton suite compiled for the GPU instead of interpreted, and every
#      method training ResNet-20 on digits on the GPU for 2 short epochs (gpu_smoke.sh);
#   2. then alone on the machine, the benchmarks named in BENCHES (default: masked_ops
#      threshold), GPU sections only (--device cuda). Targets: fused masked linear
#      fwd+bwd <= 1.10x dense, gate sampling >= 80% of copy bandwidth.
# At most 8 files come back from $OUT, so the logs are few. Commit the tables under
# bench/results/ (they name the device).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# PYTHONPATH: the bench scripts import sparsekern from this checkout (nothing is installed there).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
py=${PY:-python3}
summary="$OUT/summary.txt"
phase() {  # phase NAME SECONDS CMD...: run CMD with a time limit, log its exit and wall time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@"
    rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit)" >> "$summary"
    return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc
} > "$summary" 2>&1

if ! phase build-cuda 180 $py setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log" >> "$summary"
    SPARSEKERN_CPU_ONLY=1 phase build-cpu-only 120 $py setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
fi
$py -c "import sparsekern, torch; print('extension', sparsekern.HAS_EXTENSION, 'CUDA kernels registered:', sorted(o for o in torch._C._dispatch_get_all_op_names() if o.startswith('sparsekern::') and torch._C._dispatch_has_kernel_for_dispatch_key(o, 'CUDA')))" >> "$summary" 2>&1

xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 6")
tests=(-q -rfE -p no:cacheprovider --durations=10 $($py -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120"))
phase tests-cuda 200 $py -m pytest python_tests "${tests[@]}" $xdist -m "not cmake and not triton" -k cuda > "$OUT/tests-cuda.log" 2>&1 &
phase tests-triton 200 $py -m pytest python_tests "${tests[@]}" $xdist -m triton > "$OUT/tests-triton.log" 2>&1 &
phase methods-smoke 200 bash bench/gpu_smoke.sh $py cuda /tmp/gpu-smoke > "$OUT/smoke.log" 2>&1 &
wait
for f in tests-cuda tests-triton; do echo "$f: $(tail -1 "$OUT/$f.log")" >> "$summary"; done
cat "$OUT/smoke.log" >> "$summary"

# The benchmarks last, alone on the machine. BENCHES picks (default: both).
for b in ${BENCHES:-masked_ops threshold}; do
    phase "bench-$b" 200 $py "bench/bench_$b.py" --device cuda --repeats 15 >> "$OUT/bench.log" 2>&1
    cp "bench/results/$b-cuda.md" "$OUT/" 2>/dev/null
done
cat "$summary"
exit 0
