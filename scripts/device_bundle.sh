#!/usr/bin/env bash
# Builds what the GPU machine runs (it has no Rust toolchain): the `engram` CLI and the
# GPU golden-suite test binary, stripped and gzipped into .device/ (ignored by git), for
# `scripts/device_check.sh` there. Run here, then carry `.device` in the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p engram-cli
test_bin=$(cargo test --release -p engram-cuda --test golden_cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "golden_cuda" and m.get("executable"):
        print(m["executable"])')
rm -rf .device && mkdir -p .device
for pair in "target/release/engram:engram" "$test_bin:golden_cuda"; do
  src=${pair%%:*}; name=${pair##*:}
  strip -o ".device/$name" "$src"
  gzip -9 ".device/$name"
done
ls -l .device
du -sh .device
