#!/usr/bin/env bash
# Lay the package out as an install would (codegen/, tuner/, templates/, tuning_db/ under flash_mla/)
# in a target folder, for machines where pip cannot install from the network: PYTHONPATH=<target>.
set -euo pipefail
target=${1:?usage: stage_site.sh TARGET}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$target"
rm -rf "$target/flash_mla"
cp -r "$root/flash_mla" "$target/flash_mla"
for d in codegen tuner templates tuning_db; do cp -r "$root/$d" "$target/flash_mla/$d"; done
