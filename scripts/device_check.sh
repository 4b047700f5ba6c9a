#!/usr/bin/env bash
# The GPU check, in one call of at most ~7 minutes on the lent machine (NVIDIA H200, CUDA 13,
# PyTorch; no Rust toolchain, no network). Prepared with scripts/device_bundle.sh here, then:
#     device run, carry [".device"], command: bash scripts/device_check.sh
# Results land in $OUT, at most 8 files as the device tool returns them: golden.log,
# ours.jsonl, peer.json, summary.txt, and logs.tar.gz (every other log, refreshed after each
# step so that a run cut short still returns what it did). Without a GPU (a dry run here)
# every GPU step reports its error and the script still finishes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engram-device-out}
mkdir -p "$OUT"
BIN=/tmp/engram-device-bin
W=/tmp/engram-device-logs
rm -rf "$W"; mkdir -p "$BIN" "$W"
export PYTHONUNBUFFERED=1
t_start=$(date +%s)
step() {
  tar -czf "$OUT/logs.tar.gz" -C "$W" . 2>/dev/null
  echo; echo "=== [$(( $(date +%s) - t_start ))s] $*"
}

step "environment"
{
  date -u
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 || true
  command -v nvcc && nvcc --version | tail -2
  python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1
} | tee "$W/env.txt"

# CUDA 13's libnvrtc and libcublas: the toolkit's, else the PyPI wheels under Python.
libdirs=""
for lib in libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc-builtins.so.13.0; do
  f=$(find /usr/local/cuda/ /usr/local/cuda-13*/ /usr/lib/x86_64-linux-gnu /opt -name "$lib" 2>/dev/null | head -1)
  if [ -n "$f" ]; then
    libdirs="$libdirs:$(dirname "$f")"
    echo "found $f" | tee -a "$W/env.txt"
  else
    echo "not found: $lib" | tee -a "$W/env.txt"
  fi
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$W/env.txt"

for name in engram golden_cuda; do
  gzip -dc ".device/$name.gz" > "$BIN/$name" && chmod +x "$BIN/$name"
done
ENGRAM="$BIN/engram"

step "NVRTC compile of every kernel for sm_90"
timeout 60 "$ENGRAM" cuda-kernels --arch sm_90 2>&1 | tee "$W/kernels.txt"

step "golden suite on the GPU (ENGRAM_REQUIRE_GPU=1)"
ENGRAM_REQUIRE_GPU=1 ENGRAM_GOLDEN_DIR="$PWD/testdata/golden" \
  timeout 150 "$BIN/golden_cuda" --test-threads=1 --nocapture 2>&1 | tee "$OUT/golden.log" | grep -E "^parity|^test |test result|panicked|skipped|error" 

step "engram demo --device cuda (f32, then bf16)"
timeout 60 "$ENGRAM" demo --device cuda > "$W/demo_f32.log" 2>&1; echo "demo f32 exit $?"
tail -14 "$W/demo_f32.log"
timeout 60 "$ENGRAM" demo --device cuda --dtype bf16 > "$W/demo_bf16.log" 2>&1; echo "demo bf16 exit $?"
tail -3 "$W/demo_bf16.log"

step "compute-sanitizer (memcheck, racecheck) on the small cases"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    ENGRAM_REQUIRE_GPU=1 ENGRAM_GOLDEN_DIR="$PWD/testdata/golden" timeout 60 \
      compute-sanitizer --tool "$tool" --error-exitcode 9 "$BIN/golden_cuda" --test-threads=1 \
      small_layer_every_stage_f32 chunked_equals > "$W/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$W/sanitizer_$tool.log") clean summaries)"
    grep -E "ERROR SUMMARY|test result" "$W/sanitizer_$tool.log" | head -4
  done
else
  echo "compute-sanitizer: not on PATH"
fi

step "benchmarks: ours (bf16, f32), device-resident inputs"
: > "$OUT/ours.jsonl"
for dt in bf16 f32; do
  timeout 120 "$ENGRAM" bench --device cuda --suite --dtype "$dt" --runs 20 --json 2>"$W/bench_$dt.err" | tee -a "$OUT/ours.jsonl"
  tail -2 "$W/bench_$dt.err"
done

step "benchmarks: the PyTorch peer (eager, torch.compile) and the floors"
timeout 220 python3 bench/gpu_peer.py --out "$OUT/peer.json" --self-check > "$W/peer.txt" 2>&1; echo "peer exit $?"; tail -45 "$W/peer.txt"

step "summary"
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "ours.jsonl")) if l.strip().startswith("{")]
try:
    peer = json.load(open(os.path.join(out, "peer.json")))
except Exception as e:  # the peer may have failed; ours still prints
    peer = {"prefill": [], "decode": []}
def peer_prefill(dtype, L, mode):
    for r in peer.get("prefill", []):
        if r.get("dtype") == dtype and r.get("tokens") == L and r.get("mode") == mode and "tokens_per_s" in r:
            return r["tokens_per_s"]
def peer_decode(dtype, B):
    best = None
    for r in peer.get("decode", []):
        if r.get("dtype") == dtype and r.get("batch") == B and "median_us_per_step" in r:
            if best is None or r["median_us_per_step"] < best[0]:
                best = (r["median_us_per_step"], r.get("mode"))
    return best
for r in rows:
    if r["mode"] == "prefill":
        pc = peer_prefill(r["dtype"], r["tokens"], "compile")
        vs = f"  vs torch.compile {r['tokens_per_s']/pc:.2f}x" if pc else ""
        print(f"ours prefill {r['dtype']:>4} L={r['tokens']:>6}: {r['tokens_per_s']/1e6:7.2f} M tok/s ({r['median_ms']:.3f} ms){vs}; "
              f"conv_rows {r.get('conv_rows_tokens_per_s', 0)/1e6:.2f} M tok/s (diff {r.get('conv_rows_vs_strided_max_abs')}); "
              f"gemm {r['gemm_ms']:.3f} ms ({r['gemm_tflops']:.0f} TF); stages {r.get('stage_ms')}")
    else:
        pd = peer_decode(r["dtype"], r["batch"])
        vs = f"  (best torch {pd[0]:.1f} us, {pd[1]})" if pd else ""
        print(f"ours decode  {r['dtype']:>4} B={r['batch']:>4}: step {r['step_us_graph']:7.1f} us graph, "
              f"{r.get('step_us_graph_conv_rows', 0):.1f} us conv_rows graph, {r['step_us_launches']:.1f} us launches{vs}; stages {r.get('stage_us')}")
PY
for f in golden.log; do grep -E "test result" "$OUT/$f"; done
echo "total $(( $(date +%s) - t_start ))s"
tar -czf "$OUT/logs.tar.gz" -C "$W" .
