#!/usr/bin/env bash
# Every method (structured L0 too) trains ResNet-20 on digits for 2 short epochs (8 batches
# each) on DEVICE, all at once, one process each; prints each run's exit and result line,
# and the end of its log when it failed. The GPU check (gpu_check.sh) runs it with
# DEVICE=cuda: the methods end to end on the Triton / CUDA paths.
# Usage: bash bench/gpu_smoke.sh PYTHON DEVICE OUTDIR
set -u
PY=$1; DEV=$2; O=$3
mkdir -p "$O"
run() {  # run NAME ARGS...: one training run, then its verdict line
    local name=$1 rc
    shift
    timeout 150 "$PY" -m sparsekern train "$@" --model resnet20 --data digits --epochs 2 --max-batches 8 \
        --device "$DEV" --no-progress --out "$O/run_$name" > "$O/smoke_$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(grep -h '^done:' "$O/smoke_$name.log")"
    [ $rc = 0 ] || tail -15 "$O/smoke_$name.log" | sed "s/^/    $name| /"
}
run dense --method dense &
run imp --method imp --rounds 2 --sparsity 0.8 &
run oneshot --method oneshot --sparsity 0.8 &
run gmp --method gmp --sparsity 0.8 &
run dpf --method dpf --sparsity 0.8 &
run cs --method cs --rounds 2 &
run concave --method concave --rounds 2 &
run l0 --method l0 --density 0.3 &
run l0-structured --method l0 --structured --density 0.5 &
run l0-penalized --method l0-penalized --lam 1e-3 &
wait
