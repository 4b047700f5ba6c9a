#!/usr/bin/env python3
"""PyTorch peer of the Engram layer, timed side by side with `engram bench`.

The module below is the layer's math as `shared/notes/reference-semantics.md` states it
(hash, multi-head gather, value/key projections, RMSNorm gates, dilated causal depthwise
conv, SiLU, residual), written the way a PyTorch user would: eager modules, per-branch
loops. It is timed in eager mode and under torch.compile, in float32 and bfloat16.

Usage (after bench/setup_peer.sh and `cargo build --release`):
    bench/.venv/bin/python bench/pytorch_peer.py --tokens 512,4096,32768 --runs 5
Each configuration runs in its own process, so that the peak RSS reported is its own.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Default config: engram_vocab_size [646400, 646400], N=3, 8 heads of 64, D=1024, HC=4, K=4.
# Head sizes (primes) and multipliers of layer 1 (from `engram hash`; any values give the
# same cost).
PRIMES = [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523,
          646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619]
MULTS = [76993395940407, 4862694818241, 36129212583461]
V_CANON = 98627
PAD_CANON = 2


def worker(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    N, K_HEADS, D_HEAD, D, HC, TAPS = 3, 8, 64, 1024, 4, 4
    H = (N - 1) * K_HEADS
    DM = H * D_HEAD

    class EngramPeer(nn.Module):
        def __init__(self):
            super().__init__()
            rows = sum(PRIMES)
            offsets = [0]
            for p in PRIMES[:-1]:
                offsets.append(offsets[-1] + p)
            self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
            self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.long))
            self.register_buffer("mults", torch.tensor(MULTS, dtype=torch.long))
            self.embedding = nn.Embedding(rows, D_HEAD, _weight=torch.empty(rows, D_HEAD).uniform_(-1, 1))
            self.value_proj = nn.Linear(DM, D)
            self.key_projs = nn.ModuleList([nn.Linear(DM, D) for _ in range(HC)])
            self.norm1 = nn.ModuleList([nn.RMSNorm(D) for _ in range(HC)])
            self.norm2 = nn.ModuleList([nn.RMSNorm(D) for _ in range(HC)])
            self.conv = nn.Conv1d(HC * D, HC * D, TAPS, groups=HC * D, bias=False,
                                  padding=(TAPS - 1) * N, dilation=N)
            self.conv_norms = nn.ModuleList([nn.RMSNorm(D, eps=1e-5) for _ in range(HC)])

        def forward(self, canon, hidden):
            B, L = canon.shape
            shifted = [canon] + [F.pad(canon, (k, 0), value=PAD_CANON)[:, :L] for k in range(1, N)]
            heads = []
            mix = shifted[0] * self.mults[0]
            for n in range(2, N + 1):
                mix = torch.bitwise_xor(mix, shifted[n - 1] * self.mults[n - 1])
                p = self.primes[(n - 2) * K_HEADS:(n - 1) * K_HEADS]
                heads.append(torch.remainder(mix.unsqueeze(-1), p))
            hash_ids = torch.cat(heads, dim=-1)
            emb = self.embedding(hash_ids + self.offsets).flatten(-2)
            value = self.value_proj(emb)
            gates = []
            for i in range(HC):
                k = self.norm1[i](self.key_projs[i](emb))
                q = self.norm2[i](hidden[:, :, i, :])
                s = (k * q).sum(-1) / math.sqrt(D)
                s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
                gates.append(s.sigmoid().unsqueeze(-1))
            gated = torch.stack(gates, dim=2) * value.unsqueeze(2)
            normed = torch.cat([self.conv_norms[i](gated[:, :, i, :]) for i in range(HC)], dim=-1)
            y = self.conv(normed.transpose(1, 2))[..., :L]
            y = F.silu(y).transpose(1, 2).reshape(B, L, HC, D)
            return gated + y

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = EngramPeer().to(dtype).eval()
    L, B = args.tokens, args.batch
    canon = torch.randint(0, V_CANON, (B, L), dtype=torch.long)
    hidden = torch.randn(B, L, HC, D).to(dtype)
    fn = model
    t_compile = 0.0
    if args.mode == "compile":
        fn = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(canon, hidden)  # warm-up (and compilation)
        t_compile = time.perf_counter() - t0
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn(canon, hidden)
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    print(json.dumps({
        "tokens_per_s": B * L / med, "median_s": med, "warmup_s": t_compile,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }))


def run_json(cmd, timeout):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,4096,32768")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--engram", default=os.path.join(ROOT, "target", "release", "engram"))
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json-out", help="also write all rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.tokens = int(args.tokens)
        return worker(args)
    rows = []
    for L in [int(x) for x in args.tokens.split(",")]:
        for dt in args.dtypes.split(","):
            r = run_json([args.engram, "bench", "--tokens", str(L), "--batch", str(args.batch), "--dtype", dt,
                          "--runs", str(args.runs), "--json"], args.timeout)
            rows.append({"impl": "engram fused", "dtype": dt, "tokens": L, **r})
            print(json.dumps(rows[-1]), flush=True)
            for mode in args.modes.split(","):
                r = run_json([sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--dtype", dt,
                              "--tokens", str(L), "--batch", str(args.batch), "--runs", str(args.runs)], args.timeout)
                rows.append({"impl": f"torch {mode}", "dtype": dt, "tokens": L, **r})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| L | dtype | engram tok/s | torch eager tok/s | torch.compile tok/s | vs eager | vs compile | RSS engram / eager (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for L in sorted({r["tokens"] for r in rows}):
        for dt in args.dtypes.split(","):
            get = lambda impl: next((r for r in rows if r["tokens"] == L and r["dtype"] == dt and r["impl"] == impl), {})
            e, te, tc = get("engram fused"), get("torch eager"), get("torch compile")
            f = lambda r: f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "—"
            ratio = lambda a, b: f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" if "tokens_per_s" in a and "tokens_per_s" in b else "—"
            rss = lambda r: f"{r['peak_rss_bytes'] / 1e6:,.0f}" if "peak_rss_bytes" in r else "—"
            print(f"| {L} | {dt} | {f(e)} | {f(te)} | {f(tc)} | {ratio(e, te)} | {ratio(e, tc)} | {rss(e)} / {rss(te)} |")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
