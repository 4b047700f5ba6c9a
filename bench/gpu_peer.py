#!/usr/bin/env python3
"""GPU run of the PyTorch Engram peer plus the hardware floors, in one process, into one JSON.

Prefill: the peer module of bench/pytorch_peer.py at B=1, eager and torch.compile(dynamic=False).
Decode: one token per sequence per step with carried state, written as a careful user would; modes
eager, eager+graph (manual CUDA graph), compile, compile+graph, reduce-overhead. Floors: device copy
bandwidth, torch.mm throughput. f32 runs with TF32 off. The JSON is rewritten after every config.
    python3 bench/gpu_peer.py --out bench/results/gpu_peer.json --self-check      # GPU
    python3 bench/gpu_peer.py --out /tmp/x.json --device cpu --quick --self-check  # CPU dry run
"""
import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

START = time.perf_counter()

# Default geometry (same as bench/pytorch_peer.py): N=3, 8 heads per n-gram order of 64, D=1024,
# HC=4, conv kernel 4 dilated by N. Head sizes are layer 1's primes; rows = sum = ~10.3M.
PRIMES = [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523,
          646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619]
MULTS = [76993395940407, 4862694818241, 36129212583461]
V_CANON, PAD_CANON = 98627, 2
N, K_HEADS, D_HEAD, D, HC, TAPS = 3, 8, 64, 1024, 4, 4
H = (N - 1) * K_HEADS
DM = H * D_HEAD
HIST = (TAPS - 1) * N  # conv history rows per sequence (9)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


class EngramPeer(nn.Module):
    """The peer's forward, as in bench/pytorch_peer.py."""

    def __init__(self):
        super().__init__()
        rows = sum(PRIMES)
        offsets = [sum(PRIMES[:i]) for i in range(len(PRIMES))]
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


class Decoder(nn.Module):
    """One-token-per-sequence step with carried state, sharing the peer's weights.

    State: ids [B, N-1] (previous canonical ids, oldest first, PAD-initialised); ring [B, HIST, HC*D]
    of normalised conv inputs (zero-initialised = the conv's causal zero padding), slot t % HIST
    holding row t; pos [B] tokens seen. At time t, slot (t + N*j) % HIST holds x[t - HIST + N*j], the
    input of conv tap j (j < TAPS-1); tap TAPS-1 is the new row. State is updated in place.
    """

    def __init__(self, m: EngramPeer, B: int):
        super().__init__()
        dev, dt = m.value_proj.weight.device, m.value_proj.weight.dtype
        buf = lambda name, t: self.register_buffer(name, t, persistent=False)  # noqa: E731
        buf("table", m.embedding.weight.detach())
        buf("offsets", m.offsets)
        buf("primes", m.primes)
        buf("w_proj", torch.cat([m.value_proj.weight] + [k.weight for k in m.key_projs]).detach())
        buf("b_proj", torch.cat([m.value_proj.bias] + [k.bias for k in m.key_projs]).detach())
        buf("w_k", torch.stack([n.weight for n in m.norm1]).detach())
        buf("w_q", torch.stack([n.weight for n in m.norm2]).detach())
        buf("w_c", torch.stack([n.weight for n in m.conv_norms]).detach().reshape(HC * D))
        buf("w_conv", m.conv.weight.detach()[:, 0, :].t().contiguous())  # [TAPS, HC*D]
        buf("tap_off", torch.arange(0, HIST, N, device=dev))
        self.eps_k = m.norm1[0].eps or torch.finfo(dt).eps  # nn.RMSNorm(eps=None) uses finfo eps
        self.eps_q = m.norm2[0].eps or torch.finfo(dt).eps
        self.eps_c = m.conv_norms[0].eps
        self.mults = MULTS
        buf("ids", torch.full((B, N - 1), PAD_CANON, dtype=torch.long, device=dev))
        buf("ring", torch.zeros(B, HIST, HC * D, dtype=dt, device=dev))
        buf("pos", torch.zeros(B, dtype=torch.long, device=dev))
        for t in self.buffers():  # static addresses: CUDA graphs neither copy the weights nor the state,
            torch._dynamo.mark_static_address(t, guard=False)  # and the state updates stay in the graph

    def forward(self, c, h):  # c [B] int64, h [B, HC, D] -> out [B, HC, D]
        B = c.shape[0]
        mix = c * self.mults[0]
        heads = []
        for n in range(2, N + 1):  # ids[:, -1] is the previous token, ids[:, 0] the oldest
            mix = mix ^ (self.ids[:, N - n] * self.mults[n - 1])
            heads.append(mix.unsqueeze(-1) % self.primes[(n - 2) * K_HEADS:(n - 1) * K_HEADS])
        emb = F.embedding(torch.cat(heads, -1) + self.offsets, self.table).flatten(1)
        proj = F.linear(emb, self.w_proj, self.b_proj)
        value, keys = proj[:, :D], proj[:, D:].view(B, HC, D)
        k = F.rms_norm(keys, (D,), eps=self.eps_k) * self.w_k
        q = F.rms_norm(h, (D,), eps=self.eps_q) * self.w_q
        s = (k * q).sum(-1) / math.sqrt(D)
        s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
        gated = s.sigmoid().unsqueeze(-1) * value.unsqueeze(1)
        row = F.rms_norm(gated, (D,), eps=self.eps_c).reshape(B, HC * D) * self.w_c
        slots = (self.pos.unsqueeze(1) + self.tap_off) % HIST
        taps = torch.gather(self.ring, 1, slots.unsqueeze(-1).expand(B, TAPS - 1, HC * D))
        y = (taps * self.w_conv[:TAPS - 1]).sum(1) + row * self.w_conv[TAPS - 1]
        out = gated + F.silu(y).view(B, HC, D)
        self.ring.scatter_(1, (self.pos % HIST).view(B, 1, 1).expand(B, 1, HC * D), row.unsqueeze(1))
        self.ids.copy_(torch.cat([self.ids[:, 1:], c.unsqueeze(1)], 1))
        self.pos.add_(1)
        return out


def build_model(dev):
    with torch.device(dev), torch.no_grad():
        m = EngramPeer()
        for mod in m.modules():  # non-trivial norm weights, so the check covers them
            if isinstance(mod, nn.RMSNorm):
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


def sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def mark(cuda):
    if not cuda:
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def samples_ms(cuda, fn, reps, inner=1):
    """reps samples (CUDA events, else perf_counter), each the mean ms of `inner` back-to-back calls."""
    pairs = []
    for _ in range(reps):
        a = mark(cuda)
        for _ in range(inner):
            fn()
        pairs.append((a, mark(cuda)))
    sync(cuda)
    return [(a.elapsed_time(b) if cuda else (b - a) * 1e3) / inner for a, b in pairs]


def attempt(fn):
    try:
        return fn()
    except Exception as ex:  # noqa: BLE001
        return f"unavailable: {type(ex).__name__}: {ex}"


def env_info(dev):
    e = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "device": str(dev), "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "triton": attempt(lambda: __import__("triton").__version__)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        e["gpu_name"], e["sm_count"], e["cudnn"] = p.name, p.multi_processor_count, torch.backends.cudnn.version()
        e["gpu"] = attempt(lambda: {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k in dir(p)
                                    if not k.startswith("_") and not callable(v := getattr(p, k))})
        e["driver"] = attempt(lambda: subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                                      "--format=csv,noheader"], capture_output=True,
                                                     text=True, timeout=10).stdout.strip())
    return e


def floors(dev, cuda, quick, copy_gib):
    res = {}
    nbytes = (64 << 20) if quick else int(copy_gib * (1 << 30))
    src = torch.empty(nbytes // 4, device=dev).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = statistics.median(samples_ms(cuda, lambda: dst.copy_(src), 3 if quick else 10))
    res["copy"] = {"bytes": nbytes, "median_ms": ms, "GB_per_s_read_plus_write": 2 * nbytes / ms / 1e6}
    src = dst = None  # free the 2 x copy_gib before the mm floors
    L = 512 if quick else 32768
    for name, (m, k, n, dt) in {f"mm_{L}x1024x5120_bf16": (L, 1024, 5120, "bf16"),
                                f"mm_{L}x1024x5120_f32": (L, 1024, 5120, "f32"),
                                "mm_cube_bf16": ((512 if quick else 8192),) * 3 + ("bf16",)}.items():
        a = torch.randn(m, k, device=dev, dtype=DTYPES[dt])
        b = torch.randn(k, n, device=dev, dtype=DTYPES[dt])
        for _ in range(3):
            torch.mm(a, b)
        ms = statistics.median(samples_ms(cuda, lambda: torch.mm(a, b), 3 if quick else 10))
        res[name] = {"shape": [m, k, n], "dtype": dt, "median_ms": ms, "TFLOP_per_s": 2 * m * k * n / ms / 1e9}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", help="prefill lengths (default 4096,32768; quick 64)")
    ap.add_argument("--decode", help="decode batch sizes (default 1,64,256; quick 1,2)")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--modes", default="eager,compile", help="prefill modes")
    ap.add_argument("--decode-modes", default="eager,eager+graph,compile,compile+graph,reduce-overhead")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few reps (dry run)")
    ap.add_argument("--self-check", action="store_true", help="decode token by token == prefill (f32)")
    ap.add_argument("--reps", type=int, help="timed runs per config (default 20; quick 3)")
    ap.add_argument("--copy-gib", type=float, default=4.0)
    ap.add_argument("--budget-s", type=float, default=135.0,
                    help="skip configs that would start past this many seconds (compiles: 15 s earlier)")
    args = ap.parse_args()
    tokens = [int(x) for x in (args.tokens or ("64" if args.quick else "4096,32768")).split(",")]
    bsizes = [int(x) for x in (args.decode or ("1,2" if args.quick else "1,64,256")).split(",")]
    dtypes, modes = args.dtypes.split(","), args.modes.split(",")
    dmodes = args.decode_modes.split(",")
    reps = args.reps or (3 if args.quick else 20)
    bad = [x for x in dtypes if x not in DTYPES] + [x for x in modes if x not in ("eager", "compile")] + \
        [x for x in dmodes if x not in ("eager", "eager+graph", "compile", "compile+graph", "reduce-overhead")]
    if bad:
        ap.error(f"unknown dtype/mode: {bad}")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if dev.type != "cuda":  # manual graphs need CUDA (reduce-overhead on CPU runs, without graphs)
        dmodes = [m for m in dmodes if not m.endswith("+graph")]

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    if {"compile", "compile+graph", "reduce-overhead"} & set(modes + dmodes):  # start compile workers early
        attempt(lambda: __import__("torch._inductor.async_compile", fromlist=["x"]).AsyncCompile.warm_pool())
    for knob in ("cache_size_limit", "recompile_limit"):  # 2 dtypes x sizes x backends share a frame
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    el = lambda: time.perf_counter() - START  # noqa: E731
    R = {"meta": {"script": "bench/gpu_peer.py", "argv": sys.argv[1:], "env": env_info(dev),
                  "settings": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                               "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                               "float32_matmul_precision": torch.get_float32_matmul_precision(),
                               "bf16_reduced_precision_reduction":
                                   torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                               "inference_mode": True},
                  "timer": "cuda events" if cuda else
                           "time.perf_counter (no CUDA: no events, +graph decode modes skipped)",
                  "geometry": {"N": N, "heads": H, "d_head": D_HEAD, "D": D, "HC": HC, "taps": TAPS,
                               "table_rows": sum(PRIMES), "batch_prefill": 1},
                  "notes": ["prefill = the peer module of bench/pytorch_peer.py (per-branch Linear/RMSNorm)",
                            "decode = careful step: fused [5120,1024] projection, batched gates, ring-buffer "
                            "conv state updated in place; tokens_per_s = B / step time",
                            "decode compile: one torch.compile(Decoder.forward) per mode, shapes static per "
                            "batch size (the static-address state pins B), so each (B, dtype) compiles once",
                            "eager+graph / compile+graph = manual torch.cuda.graph capture of the step",
                            "copy GB/s counts bytes read + written"]},
         "floors": {}, "prefill": [], "decode": []}

    def save():
        R["meta"]["elapsed_s"] = el()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(R, fh, indent=1, default=str)
        os.replace(tmp, args.out)

    def log(msg):
        print(f"[{el():6.1f}s] {msg}", flush=True)

    def guarded(fn):
        try:
            return fn()
        except Exception as ex:  # noqa: BLE001 -- per-config: OOM, compile failure, ...
            if cuda:
                torch.cuda.empty_cache()
            return {"error": f"{type(ex).__name__}: {str(ex)[:800]}"}

    log(f"torch {torch.__version__} on {dev} ({R['meta']['env'].get('gpu_name', platform.processor())})")
    save()
    with torch.inference_mode():
        R["floors"] = guarded(lambda: floors(dev, cuda, args.quick, args.copy_gib))
        log(f"floors {json.dumps(R['floors'])}")
        save()
        t0 = time.perf_counter()
        master = build_model(dev)  # f32; other dtypes are converted copies (same weights)
        models = {"f32": master, **{dt: copy.deepcopy(master).to(DTYPES[dt]) for dt in dtypes if dt != "f32"}}
        sync(cuda)
        R["meta"]["model_build_s"] = time.perf_counter() - t0
        log(f"models built ({', '.join(models)}) in {R['meta']['model_build_s']:.1f}s")

        if args.self_check:
            def self_check():
                g = torch.Generator(device=dev).manual_seed(1)
                B, L = 2, 23  # > HIST and > N so the ring wraps and the id history fills
                canon = torch.randint(0, V_CANON, (B, L), device=dev, generator=g)
                hidden = torch.randn(B, L, HC, D, device=dev, generator=g)
                ref = master(canon, hidden)
                dec = Decoder(master, B)
                steps = torch.stack([dec(canon[:, t], hidden[:, t]) for t in range(L)], 1)
                err = (steps - ref).abs().max().item()
                return {"B": B, "L": L, "dtype": "f32", "max_abs_diff": err, "ref_max_abs": ref.abs().max().item(),
                        "pass": err < 1e-4}
            R["self_check"] = guarded(self_check)
            log(f"self-check decode vs prefill: {R['self_check']}")
            save()

        def accuracy():
            L = min(4096, max(tokens))
            g = torch.Generator(device=dev).manual_seed(2)
            canon = torch.randint(0, V_CANON, (1, L), device=dev, generator=g)
            hidden = torch.randn(1, L, HC, D, device=dev, generator=g)
            ref = master(canon, hidden)
            m16 = models.get("bf16") or copy.deepcopy(master).to(torch.bfloat16)
            lo = m16(canon, hidden.to(torch.bfloat16)).float()
            return {"L": L, "max_abs_err": (lo - ref).abs().max().item(),
                    "rel_l2_err": ((lo - ref).norm() / ref.norm()).item(), "ref_max_abs": ref.abs().max().item()}
        R["bf16_vs_f32"] = guarded(accuracy)
        log(f"bf16 vs f32 eager: {R['bf16_vs_f32']}")
        save()

        compiled = {}

        def inductor_counts(before=None):  # compile-cache hits/misses and cudagraph skips (deltas)
            now = {k: v for k, v in counters["inductor"].items() if k.startswith(("fxgraph_cache", "cudagraph"))}
            return now if before is None else {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}

        def reset_mem():
            sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                return torch.cuda.memory_allocated()

        def prefill(L, dt, mode):
            m = models[dt]
            fn = compiled.setdefault(("prefill", dt), torch.compile(m, dynamic=False)) if mode == "compile" else m
            canon = torch.randint(0, V_CANON, (1, L), device=dev)
            hidden = torch.randn(1, L, HC, D, device=dev, dtype=DTYPES[dt])
            mem0, cnt0 = reset_mem(), inductor_counts()
            t0 = time.perf_counter()
            fn(canon, hidden)
            sync(cuda)
            first = time.perf_counter() - t0
            for _ in range(2):
                fn(canon, hidden)
            ts = samples_ms(cuda, lambda: fn(canon, hidden), reps)
            med = statistics.median(ts)
            r = {"median_ms": med, "min_ms": min(ts), "tokens_per_s": L / (med / 1e3), "runs": len(ts),
                 "first_call_s": first}
            if mode == "compile":
                r.update(compile_s=first, **inductor_counts(cnt0))
            if cuda:  # peak of all allocations (weights included) / allocated before the config
                r["peak_mem_bytes"], r["mem_before_bytes"] = torch.cuda.max_memory_allocated(), mem0
            return r

        def decode(B, dt, mode):
            m = models[dt]
            dec = Decoder(m, B)
            c = torch.randint(0, V_CANON, (B,), device=dev)
            h = torch.randn(B, HC, D, device=dev, dtype=DTYPES[dt])
            # One compiled Decoder.forward per compile mode, shared by all instances: a fresh torch.compile
            # wrapper per instance would fail dynamo's backend guard and recompile every configuration.
            kind = {"compile": "default", "compile+graph": "default", "reduce-overhead": "reduce-overhead"}
            fn = compiled.setdefault(kind[mode], torch.compile(Decoder.forward, mode=kind[mode])) \
                if mode in kind else Decoder.forward

            def step():
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                return fn(dec, c, h)
            cnt0 = inductor_counts()
            mem0 = reset_mem()
            t0 = time.perf_counter()
            step()
            sync(cuda)
            first = time.perf_counter() - t0
            if mode.endswith("+graph"):  # manual capture; inputs c, h and the state are static tensors
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = step()
                step = lambda: (graph.replay(), out)[1]  # noqa: E731
            for _ in range(3):
                step()
            # Check: from a fresh state (reset in place), 12 steps of new tokens == the eager Decoder.
            dec.ids.fill_(PAD_CANON), dec.ring.zero_(), dec.pos.zero_()
            ref, g, diff = Decoder(m, B), torch.Generator(device=dev).manual_seed(3), 0.0
            for _ in range(12):
                c.copy_(torch.randint(0, V_CANON, (B,), device=dev, generator=g))
                h.copy_(torch.randn(B, HC, D, device=dev, generator=g))
                diff = max(diff, (step().float() - ref(c, h).float()).abs().max().item())
            inner = 20
            ts = samples_ms(cuda, step, max(reps // 2, 3), inner)
            med = statistics.median(ts)
            r = {"median_us_per_step": med * 1e3, "min_us_per_step": min(ts) * 1e3,
                 "tokens_per_s": B / (med / 1e3), "steps_timed": len(ts) * inner, "first_call_s": first,
                 "max_abs_diff_vs_eager_12_steps": diff, **inductor_counts(cnt0)}
            if mode in ("compile", "reduce-overhead"):
                r["compile_s"] = first
            if cuda:  # peak of all allocations (weights included) / allocated before the config
                r["peak_mem_bytes"], r["mem_before_bytes"] = torch.cuda.max_memory_allocated(), mem0
            return r

        # Priority order, so that a budget cut loses the least: eager first, then compile, then CUDA graphs
        # through reduce-overhead (each compile is ~5-30 s and cannot be interrupted).
        rank = {"eager": 0, "eager+graph": 1, "compile": 2, "compile+graph": 3, "reduce-overhead": 4}
        jobs = [((rank.get(mo, 5), dtypes.index(dt), 0), "prefill", {"tokens": L, "dtype": dt, "mode": mo},
                 prefill, (L, dt, mo)) for mo in modes for dt in dtypes for L in tokens]
        jobs += [((rank.get(mo, 5), dtypes.index(dt), 1), "decode", {"batch": B, "dtype": dt, "mode": mo},
                  decode, (B, dt, mo)) for mo in dmodes for dt in dtypes for B in bsizes]
        jobs.sort(key=lambda j: j[0])
        for _, section, key, fn, fargs in jobs:
            needs_compile = key["mode"] not in ("eager", "eager+graph")
            if el() > args.budget_s - (15 if needs_compile else 2):
                rec = {**key, "skipped": f"time budget {args.budget_s:.0f}s (compiles: -15s) at {el():.0f}s"}
            else:
                rec = {**key, **guarded(lambda: fn(*fargs))}
            R[section].append(rec)
            log(f"{section} {json.dumps(rec)}")
            save()

    # Human-readable summary.
    print("\n== floors ==")
    for k, v in R["floors"].items():
        keep = ("median_ms", "GB_per_s_read_plus_write", "TFLOP_per_s")
        print(f"  {k:28s}", {kk: round(vv, 3) for kk, vv in v.items() if kk in keep} if isinstance(v, dict) else v)
    print(f"== bf16 vs f32: {R.get('bf16_vs_f32')}")
    if "self_check" in R:
        print(f"== self-check: {R['self_check']}")

    def table(title, rows, keys, vals):
        print(f"\n== {title} ==")
        for r in rows:
            head = "  " + " ".join(f"{k}={r[k]}" for k in keys)
            bad = r.get("error", r.get("skipped"))
            print(f"{head:36s} " + (bad[:80] if bad else "  ".join(
                f"{lbl} {fmt.format(r[k])}" for k, lbl, fmt in vals if k in r)))
    table("prefill (B=1)", R["prefill"], ("tokens", "dtype", "mode"),
          [("median_ms", "ms", "{:8.3f}"), ("tokens_per_s", "tok/s", "{:12,.0f}"),
           ("peak_mem_bytes", "peakB", "{:.3g}"), ("compile_s", "compile_s", "{:.1f}")])
    table("decode (1 token/sequence/step)", R["decode"], ("batch", "dtype", "mode"),
          [("median_us_per_step", "us/step", "{:8.1f}"), ("tokens_per_s", "tok/s", "{:12,.0f}"),
           ("max_abs_diff_vs_eager_12_steps", "diff", "{:.1e}"), ("compile_s", "compile_s", "{:.1f}")])
    save()
    print(f"\nwrote {args.out} in {el():.1f}s", flush=True)


if __name__ == "__main__":
    main()
