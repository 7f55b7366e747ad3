#!/usr/bin/env bash
# One device call: several lanes of bench/gpu_session.sh stages in parallel (one GPU each), results packed
# so they come back (the device tool returns at most 8 files from $OUT), and compile caches carried between
# calls (machines start bare, and fla's Triton autotuning alone takes minutes per kernel).
#   bash bench/gpu_call.sh 'CUDA_VISIBLE_DEVICES=0 BENCH_ARGS="--configs gla_340M" bench' \
#                          'CUDA_VISIBLE_DEVICES=1 TESTS=tests/test_models.py tests'
# Each lane is `[VAR=value ...] stage [stage ...]`, run by gpu_session.sh with OUT=$OUT/laneN.
# Outputs: $OUT/results.tgz (every lane's files), $OUT/cache.tgz.part-* (Triton autotune results and
# Inductor's compile cache, without Triton binaries, which are rebuilt in seconds; split in parts of 15 MiB).
# Put the parts of one call in .gpu_cache/ (ignored by git) and name .gpu_cache in the next call's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
CACHE=/tmp/gpu_cache
mkdir -p "$OUT" "$CACHE"
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c 'import fla, lm_eval' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_call: installing .whl/ failed"; exit 1; }
fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the lanes then skip gpu_session's install
compgen -G ".gpu_cache/cache.tgz.part-*" >/dev/null && cat .gpu_cache/cache.tgz.part-* | tar xz -C "$CACHE" \
  && echo "gpu_call: caches restored"
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
specs=("$@")

lane=0
for spec in "$@"; do
  dir=$OUT/lane$lane
  mkdir -p "$dir"
  # the lane's VAR=value words become its environment, the rest its stages
  (eval "set -- $spec"
   while [[ $# -gt 0 && "$1" == *=* ]]; do export "$1"; shift; done
   OUT=$dir bash bench/gpu_session.sh "$@" > "$dir/session.log" 2>&1) &
  lane=$((lane + 1))
done
wait
for ((i = 0; i < lane; i++)); do echo "##### lane $i: ${specs[$i]}"; grep -v "^ " "$OUT/lane$i/session.log" | tail -40; done
tar czf "$OUT/results.tgz" -C "$OUT" $(cd "$OUT" && ls -d lane[0-9]*) && rm -rf "$OUT"/lane[0-9]*
# Inductor entries over 3 MiB (graphs holding large constants, from tests) are left out: the call's files
# must stay within the device tool's 64 MiB carry, and those are rebuilt when needed
(cd "$CACHE" && find . -name "*.autotune.json" -o -path "./inductor/*" ! -path "*/triton/*" -type f -size -3M) \
  | tar czf - -C "$CACHE" -T - 2>/dev/null | split -b 15m - "$OUT/cache.tgz.part-"  # files come back up to 16 MiB
ls -la "$OUT"
