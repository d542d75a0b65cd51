#!/bin/bash
# One call on the GPU machine: install the carried wheels, point tileup at the carried models,
# write the random full-size checkpoints, optionally run tests/gpu, then `bench/gpu.py run`
# with the given arguments and a deadline inside the call's limit. Everything it prints also
# goes to $OUT/log.txt (what comes back even when the call is stopped at its limit); the
# results go to $OUT/res (gpu.json, gpu.md).
#
#   device run, carry [".whl", ".carry"], timeout_s 600:
#     bash bench/device_call.sh COMMIT [--tests] [--sdxl] [--seconds N] -- --jobs reference,...
#
# COMMIT: `git rev-parse --short HEAD` here (the machine has no .git). --seconds: the call's
# limit (default 600; the run's deadline is 30 s before it). Locally, with toy checkpoints:
#   OUT=/tmp/out bash bench/device_call.sh test --smoke -- --jobs reference --no-flops
set -o pipefail
start=$(date +%s)
commit=${1:?usage: device_call.sh COMMIT [--tests] [--sdxl] [--smoke] [--seconds N] -- RUN-ARGS}
shift
tests=0 sdxl="" smoke="" seconds=600
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case $1 in
        --tests) tests=1 ;;
        --sdxl) sdxl="--sdxl" ;;
        --smoke) smoke="--smoke" ;;
        --seconds) seconds=$2; shift ;;
        *) echo "device_call.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ "${1:-}" = "--" ] && shift
out=${OUT:?device_call.sh: OUT is not set (the device machine sets it)}
log=$out/log.txt
deadline=$((start + seconds - 30))
# warnings that fill the log without saying anything about the run
quiet='kept in float32|UserWarning|warnings.warn\(|originates from|is_torch_version|_warn_once|sync_debug_mode'
say() { echo "== $* ($(($(date +%s) - start)) s)" | tee -a "$log"; }
left() { echo $((deadline - $(date +%s))); }

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
if [ -d .carry ]; then  # tileup and the GPU tests read the models from $TILEUP_SHARED/models
    mkdir -p /tmp/shared && ln -sfn "$PWD/.carry" /tmp/shared/models
    export TILEUP_SHARED=/tmp/shared
fi
sr=${TILEUP_SHARED:-../shared}/models/RealESRGAN_x4plus.safetensors
work=/tmp/tileup-bench$smoke
results=()  # on the device: merged into the carried bench/results/gpu.json, as the README says
[ -n "$smoke" ] && results=(--results "$work/gpu.json")  # toy figures never touch it

say "prepare"
timeout "$(left)" python3 bench/gpu.py prepare --out "$work" $sdxl $smoke 2>&1 \
    | grep -vE "$quiet" | tail -3 | tee -a "$log"
if [ $tests = 1 ]; then
    say "tests/gpu"
    timeout "$(left)" python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 \
        | grep -vE "$quiet" | tail -15 | tee -a "$log"
fi
say "bench/gpu.py run $*"
timeout "$(left)" python3 bench/gpu.py run --work "$work" --sr-model "$sr" --commit "$commit" \
    --mirror "$out/res" --deadline "$deadline" $smoke "${results[@]}" "$@" 2>&1 \
    | grep -vE "$quiet" | tail -40 | tee -a "$log"
say "end"
