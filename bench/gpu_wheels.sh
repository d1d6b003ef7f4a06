#!/usr/bin/env bash
# Fetch, on a networked machine, the wheels a GPU machine without network access needs, for its Python 3.12,
# into .whl/ (git-ignored). bench/gpu_check.sh installs them there. Versions: the ones the tests run with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl bitsandbytes==0.50.2 liger-kernel==0.8.5 transformers==5.24.0
du -ch .whl/*.whl | tail -n 1  # their total size
