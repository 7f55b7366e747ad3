#!/usr/bin/env bash
# flame-compatible training launcher: bash train.sh --job.config_file flame/models/fla.toml --job.dump_folder exp/x ...
# Environment: NGPU (default: all visible GPUs, 1 process on a CPU-only machine), NNODE, MASTER_ADDR,
# MASTER_PORT, LOG_RANK. Logs are teed to <dump_folder>/logs. See README.md.
# One run per dump folder (<dump_folder>/.lmlab.lock; a second one exits 2). This script execs the launcher, so
# its PID is the launcher's: if it is killed, torchrun and the trainers get SIGTERM and save (Linux).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" -m lmlab.launch "$@"
