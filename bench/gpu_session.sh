#!/usr/bin/env bash
# The GPU work of issues 3, 5, 6 and 7 in stages, for the device machine (bench/README.md, "GPU session").
#   bash bench/gpu_session.sh STAGE [STAGE ...]   stages: env tests scaling bench bench-large experiment eval fda-parallel
# Results go under $OUT (the device tool's folder; default out/gpu). Each stage has its own time limit, so one
# that hangs still leaves the others' results. Packages missing from the GPU image come as wheels in .whl/
# (made here by bench/gpu_wheels.sh). Everything is overridable for a CPU smoke run, e.g.
#   CONFIG=configs/tiny_gla.json BATCH=2 SEQ=64 ACCUM=1 STEPS=6 bash bench/gpu_session.sh scaling
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHON=$PY PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c 'import datasets, torchdata, lm_eval, fla, tomli_w' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=$PWD/src:/tmp/site
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
CONFIG=${CONFIG:-configs/gated_deltanet_340M.json}

stage_env() {  # versions, the card, and whether every import works
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
  "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "datasets", "torchdata", "lm_eval", "fla", "tokenizers", "pyarrow"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # report every failure, not just the first
        print(name, "NOT IMPORTABLE:", type(exc).__name__, str(exc).splitlines()[0][:200])
import lmlab
from lmlab.kernels import dispatch
print("lmlab kernels:", dispatch.describe("auto"))
EOF
}

stage_tests() {  # kernel / model accuracy on the card (1 GPU) and the 2-GPU NCCL run (when there are 2)
  # TESTS picks test files; PYTEST_ARGS adds options (e.g. --timeout 120: pytest-timeout is on the GPU image)
  # the whole log comes back (failures' tracebacks included); the reply shows its end
  timeout "${TESTS_TIMEOUT:-540}" "$PY" -m pytest -v -m gpu -p no:cacheprovider ${TESTS:-tests/} -rA --tb=short \
    --durations=15 ${PYTEST_ARGS:-} > "$OUT/gpu_tests.txt" 2>&1
  tail -60 "$OUT/gpu_tests.txt"
}

stage_scaling() {  # the paper's command (340M, sizes as the paper) at 1 and all GPUs: tokens/s per GPU
  local data=/tmp/lmlab_data
  "$PY" - "$data" <<'EOF'
import sys
from pathlib import Path
from lmlab.quickstart import python_corpus, train_tokenizer, write_corpus
out = Path(sys.argv[1])
write_corpus(out)
train_tokenizer(python_corpus(), out / "tokenizer")
EOF
  local counts="1"
  [[ "$GPUS" -gt 1 ]] && counts="1 $GPUS"
  for n in $counts; do
    rm -rf "exp/scaling_$n"
    NGPU=$n timeout "${SCALING_TIMEOUT:-150}" bash train.sh --job.config_file flame/models/fla.toml \
      --job.dump_folder "exp/scaling_$n" --model.config "$CONFIG" --model.tokenizer_path "$data/tokenizer" \
      --optimizer.name AdamW --optimizer.eps 1e-15 --optimizer.lr 1e-3 \
      --lr_scheduler.warmup_steps 1024 --lr_scheduler.lr_min 0.1 --lr_scheduler.decay_type cosine \
      --training.batch_size "${BATCH:-16}" --training.seq_len "${SEQ:-2048}" \
      --training.gradient_accumulation_steps "${ACCUM:-4}" --training.steps "${STEPS:-30}" ${MICRO:+--training.micro_batch_size $MICRO} \
      --training.max_norm 1.0 --training.skip_nan_inf --training.dataset "$data/train.jsonl" \
      --training.dataset_split train --training.num_workers 12 --training.prefetch_factor 2 \
      --training.seed 42 --training.compile ${NO_COMPILE:+false} --checkpoint.interval 2048 --checkpoint.load_step -1 \
      --checkpoint.keep_latest_k 2 --metrics.log_freq 1 > "$OUT/scaling_$n.log" 2>&1
    echo "gpu_session: scaling $n GPU(s) exited $?" | tee -a "$OUT/scaling_$n.log"
    cp "exp/scaling_$n/metrics.jsonl" "$OUT/scaling_$n.metrics.jsonl" 2>/dev/null
  done
  "$PY" - "$OUT" $counts <<'EOF' | tee "$OUT/scaling.md"
import json, sys
from pathlib import Path
out, counts = Path(sys.argv[1]), [int(n) for n in sys.argv[2:]]
rate = {}
for n in counts:
    path = out / f"scaling_{n}.metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    steady = [r["tokens_per_second_per_device"] for r in records[len(records) // 2:]]  # after compile/warm-up
    if steady:
        rate[n] = sum(steady) / len(steady)
        print(f"{n} GPU(s): {rate[n]:,.0f} tokens/s per GPU over the last {len(steady)} of {len(records)} steps"
              + (f", memory {records[-1]['memory_gib']:.1f} GiB" if "memory_gib" in records[-1] else ""))
    else:
        print(f"{n} GPU(s): no metrics (see scaling_{n}.log)")
for n in counts[1:]:
    if n in rate and 1 in rate:
        print(f"scaling efficiency 1 -> {n} GPUs: {rate[n] / rate[1]:.1%} (tokens/s per GPU)")
EOF
}

stage_bench() {  # bench/train_bench.py, 340M set unless BENCH_ARGS says otherwise
  local tag=${1:-}  # suffix of the output files, so that both bench stages can run in one session
  timeout "${BENCH_TIMEOUT:-540}" "$PY" bench/train_bench.py ${BENCH_ARGS:-} --out "$OUT/results$tag.json" \
    --results-md "$OUT/RESULTS$tag.md" --profile "$OUT/profile$tag.txt" 2>&1 | tee "$OUT/bench$tag.log" | grep -v "^ "
}

stage_bench-large() {  # 1.3B set unless LARGE_ARGS says otherwise; LARGE_TIMEOUT
  BENCH_ARGS="--large --steps 3 --warmup 2 --no-baseline ${LARGE_ARGS:-}" BENCH_TIMEOUT=${LARGE_TIMEOUT:-540} \
    stage_bench _large
}

stage_experiment() {  # EXPERIMENT="script.py [args]" from bench/experiments/; its output -> $OUT/<script>.log
  local name
  name=$(basename "${EXPERIMENT%% *}" .py)
  OUT=$OUT timeout "${EXPERIMENT_TIMEOUT:-540}" "$PY" bench/experiments/$EXPERIMENT > "$OUT/$name.log" 2>&1
  echo "gpu_session: $name exited $?"; tail -40 "$OUT/$name.log"
}

stage_eval() {  # evaluation wall times (random 340M weights, synthetic data of the real sizes): lmlab vs stock
  # CONFIG may name several configs (one after another, EVAL_TIMEOUT each): one call then covers several families;
  # names in configs/ or JSON paths, as train_bench.py's --configs
  local config name
  for config in $CONFIG; do
    [[ "$config" == *.json ]] || config=configs/$config.json
    name=$(basename "$config" .json)
    echo "gpu_session: eval $name"
    timeout "${EVAL_TIMEOUT:-540}" "$PY" bench/eval_bench.py --config "$config" \
      --out "$OUT/eval_$name${EVAL_TAG:-}.json" ${EVAL_ARGS:---stock-limit 5} > "$OUT/eval_$name${EVAL_TAG:-}.log" 2>&1
    grep "^eval_bench:" "$OUT/eval_$name${EVAL_TAG:-}.log"
  done
}

stage_fda-parallel() {  # launch_hf.py -p over all visible GPUs vs one job: wall time, same generations
  EVAL_ARGS="--fda-only --parallel --batch-sizes 1 --stock-limit 0 ${EVAL_ARGS:-}" EVAL_TIMEOUT=${FDA_TIMEOUT:-240} EVAL_TAG=_fda_parallel stage_eval
}

for stage in "$@"; do
  start=$SECONDS
  echo "=== gpu_session: $stage ($GPUS GPU(s)) ==="
  if ! declare -F "stage_$stage" >/dev/null; then echo "gpu_session: unknown stage $stage"; exit 2; fi
  "stage_$stage"
  echo "=== gpu_session: $stage took $((SECONDS - start)) s ==="
done
