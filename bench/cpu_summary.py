"""Summary tables of bench/cpu_bench.sh's runs.jsonl: prefill fma_peak_share (median of the
rounds) per ISA and dtype, with the share of the microkernel's own limit with its operands
in L1 where the bench measured it (kernel_l1_share), and decode step latency against its
floor per B."""
import json
import statistics
import sys
from collections import defaultdict

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
pre = defaultdict(list)
for r in runs:
    if r["mode"] == "prefill":
        pre[(r["isa"], r["dtype"])].append(r)
print("| ISA | dtype | kernel | prefill tok/s (median) | fma_peak_share per round | median "
      "| kernel_l1_share per round | median |")
print("|---|---|---|---|---|---|---|---|")
for (isa, dt), rs in pre.items():
    shares = [x["fma_peak_share"] for x in rs]
    l1 = [x["kernel_l1_share"] for x in rs if x.get("kernel_l1_share") is not None]
    tps = statistics.median(x["tokens_per_s"] for x in rs)
    l1_cols = (", ".join(f"{s:.2f}" for s in l1) + f" | {statistics.median(l1):.3f}") if l1 else "- | -"
    print(f"| {isa} | {dt} | {rs[0]['kernel']} | {tps:,.0f} | "
          + ", ".join(f"{s:.2f}" for s in shares) + f" | {statistics.median(shares):.3f} | {l1_cols} |")
print()
print("| ISA | dtype | B | step (ms) | tokens/s | % of prefill | floor (ms) | step / floor |")
print("|---|---|---|---|---|---|---|---|")
for r in runs:
    if r["mode"] != "decode":
        continue
    p = pre.get((r["isa"], r["dtype"]))
    share = ""
    if p:
        share = f"{100 * r['tokens_per_s'] / statistics.median(x['tokens_per_s'] for x in p):.0f}%"
    f = r["step_floor_from"]
    # "warm": the weights at the rate of a buffer of their size read warm (from d5eb8b3 on;
    # that build still said "from cache (a buffer of their size read warm)").
    src = "warm" if "read warm" in f else "cache" if "cache" in f else (
        "memory" if "memory" in f else "FLOPs")
    print(f"| {r['isa']} | {r['dtype']} | {r['batch']} | {r['step_latency_ms']:.3f} | "
          f"{r['tokens_per_s']:,.0f} | {share} | {r['step_floor_ms']:.3f} ({src}) | "
          f"{r['step_over_floor']:.2f} |")
