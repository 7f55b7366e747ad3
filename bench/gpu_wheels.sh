#!/usr/bin/env bash
# Wheels for the device machine's image (Python 3.12; it has torch, triton, transformers, pyarrow, pandas,
# xxhash, einops, pytest, python-dateutil, but not these): run here, then name .whl in the run tool's `carry`
# (bench/README.md, "GPU session"). Versions are the ones pinned/locked in this checkout's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 torchdata==0.11.0 fla-core==0.6.0
      flash-linear-attention==0.6.0 tomli-w==1.2.0 lm-eval==0.4.13 evaluate==0.4.6 pytablewriter==1.2.1
      dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5
      chardet==6.0.0.post1 word2number==1.1 more-itertools==11.2.1 rouge-score==0.1.2 nltk==3.10.4
      sqlitedict==2.1.0 pytz==2026.6 defusedxml==0.7.1)
rm -rf .whl && mkdir -p .whl
for pkg in "${PKGS[@]}"; do
  # a wheel for CPython 3.12 where one exists (multiprocess has one per Python version), else build one
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$pkg" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$pkg"
done
ls .whl | wc -l
du -sh .whl
