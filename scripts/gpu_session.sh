#!/usr/bin/env bash
# One lent GPU session, as one command: every ours-vs-diffusers benchmark at its GPU size, then (given a stage) a
# training stage of the default model's recipe with the time that is left. Logs and the stage's export go to
# $OUT (default ./gpu-out): bench.log, train.log, nvidia-smi.txt, each trained run's export as RUN.tar split
# into pieces under 12 MiB (cat RUN.tar.* | tar -x), and the stage's scores from the GPU (eval.json, eval.log).
#
#   bash scripts/gpu_session.sh                  # benchmarks only
#   BUDGET=570 bash scripts/gpu_session.sh wide-gpu   # benchmarks, then stage wide-gpu in the seconds left
#
# BUDGET: seconds the whole script may take (default 570); the stage's max_minutes is what is left after the
# benchmarks, less the time to cache its clips, export and score it (clipped to 2.5-5 minutes); with less than 245 s left
# the stage is skipped, saying so (the benchmarks take about 390 s: run the stage in a second call with
# SKIP_BENCH=1). SMOKE=1 runs every part at a tiny size on any device (to try the script on a CPU first).
set -u
start=$(date +%s)
budget=${BUDGET:-570}
out=${OUT:-gpu-out}
stage=${1:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
left() { echo $((budget - ($(date +%s) - start))); }

# run NAME SECONDS CMD...: CMD under a time limit; its output appended to $out/bench.log and shown
run() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(left) s of the budget left): $*" | tee -a "$out/bench.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/bench.log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$out/bench.log"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$out/nvidia-smi.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$out/bench.log"

if [ "${SKIP_BENCH:-0}" = 1 ]; then  # a second call: the stage alone
    clips=() minutes="" more=()
elif [ "${SMOKE:-0}" = 1 ]; then
    run dit 120 python3 scripts/bench_dit.py --latent 1 4 4 --text-len 8 --repeats 1
    run vae 120 python3 scripts/bench_vae.py --preset tiny --frames 1 --size 32 32 --repeats 1
    run train_step 120 python3 scripts/bench_train_step.py --vs-diffusers --tiny
    run pipeline 180 python3 scripts/bench_pipeline.py --tiny
    run pipeline-split 180 python3 scripts/bench_pipeline.py --tiny --split-guidance
    clips=(--cache-clips 64 --device cpu) minutes=0.2 more=(batch_size=8)  # any stage that caches: 64 clips
    eval_device=cpu eval_args=(--splits heldout --count 4 --seeds 0)
else
    run dit 70 python3 scripts/bench_dit.py --device cuda --dtype bf16 --full
    run vae 75 python3 scripts/bench_vae.py --device cuda --dtype bf16 --frames 81 --size 480 832 \
        --cudnn-benchmark --repeats 2
    run train_step 90 python3 scripts/bench_train_step.py --vs-diffusers --device cuda --precision bf16 \
        --latent 5 30 52 --steps 3
    run pipeline 85 python3 scripts/bench_pipeline.py --device cuda --frames 17 --steps 10
    run pipeline-split 60 python3 scripts/bench_pipeline.py --device cuda --frames 17 --steps 10 --split-guidance
    clips=() minutes="" more=()
fi

[ -z "$stage" ] && exit 0
if [ -z "$minutes" ] && [ "$(left)" -lt 245 ]; then  # 2.5 minutes of steps and ~95 s around them
    echo "=== stage $stage: skipped, $(left) s of the budget left and it needs 245 s: run it in a call of its own" \
         "(BUDGET=570 SKIP_BENCH=1 bash scripts/gpu_session.sh $stage)" | tee -a "$out/train.log"
    exit 0
fi
if [ -z "${eval_device:-}" ]; then  # on the GPU: both text-to-video splits a stage of issue 26 is read on
    eval_device=cuda eval_args=(--splits heldout wide --seeds 0 1 2 --batch 72)
fi
reserve=$([ "${SKIP_EVAL:-0}" = 1 ] && echo 0 || echo 100)  # seconds kept for scoring the stage afterwards
if [ -z "$minutes" ]; then  # the budget left, less ~95 s for caching the clips, loading and exporting
    minutes=$(python3 -c "print(round(min(5.0, max(2.5, ($(left) - 95 - reserve) / 60)), 2))")
fi
echo "=== stage $stage: max_minutes=$minutes ($(left) s of the budget left)" | tee -a "$out/train.log"
work=runs/gpu-session
python3 scripts/train_default.py --out "$work" --adopt-ship --stages "$stage" "${clips[@]}" \
    --refine-args "max_minutes=$minutes" "${more[@]}" 2>&1 |
    tr '\r' '\n' | grep -v -E "^(train|cache): +[0-9]+%" | tee -a "$out/train.log"
echo "=== stage $stage: exit ${PIPESTATUS[0]} ($(left) s of the budget left)" | tee -a "$out/train.log"
for f in "$work"/*.log "$work"/timings.json; do  # each run's log: its last progress lines (steps, loss, speed)
    [ -f "$f" ] && { echo "=== $f"; tr '\r' '\n' <"$f" | tail -n 40; } >>"$out/train.log"
done
adopted=$(python3 -c "import json; print(' '.join(json.load(open('vidlatent/weights/default/runs.json')).values()))")
for final in "$work"/*/final; do
    run_name=$(basename "$(dirname "$final")")
    case " $adopted " in *" $run_name "*) continue ;; esac  # the shipped model's own runs, adopted
    if [ -d "$final/dit" ]; then  # a denoiser run: its dit/, text_encoder/ and pipeline.json
        parts=("$run_name/final/dit" "$run_name/final/text_encoder" "$run_name/final/pipeline.json")
    elif [ -d "$final/vae" ]; then  # a VAE run
        parts=("$run_name/final/vae")
    else
        continue
    fi
    tar -C "$work" -cf - "${parts[@]}" | split -b 12M - "$out/$run_name.tar."
done

# the stage scored where it trained (SKIP_EVAL=1: not): assembled as a candidate, its lanes first and the rest the
# shipped model's (a stage with experts: both), and read by the oracle, 216 held-out and 216 wide prompts x seeds
# 0-2 (about 25 minutes on 2 CPU cores), into eval.json and eval.log
if [ "${SKIP_EVAL:-0}" != 1 ]; then
    echo "=== eval of stage $stage ($(left) s of the budget left)" | tee -a "$out/eval.log"
    python3 scripts/train_default.py --out "$work" --stages ship --from-stages "$stage" --ship "$work/candidate" \
        2>&1 | tee -a "$out/eval.log"
    timeout $(($(left) - 10)) python3 scripts/eval_default.py --model "$work/candidate" --device "$eval_device" \
        --vae-clips 0 --cli-runs 0 "${eval_args[@]}" --json "$out/eval.json" 2>&1 |
        tr '\r' '\n' | grep -v -E ": +[0-9]+/[0-9]+$" | tee -a "$out/eval.log"
    echo "=== eval: exit ${PIPESTATUS[0]} ($(left) s of the budget left)" | tee -a "$out/eval.log"
fi
ls -la "$out"
