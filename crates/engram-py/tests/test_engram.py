"""The engine through Python: golden stages via NumPy, streaming, V4.1, errors, the GIL, leaks."""

import pathlib
import pickle
import resource
import threading
import time

import numpy as np
import pytest

import engram
from conftest import read_safetensors

CASES = ["seed_text", "multilingual", "batch2", "long"]


def test_golden_every_stage_through_numpy(small, stages, golden):
    # The reference path keeps every stage; the fused one gated_value and short_conv too.
    ref = engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors", path="reference")
    for layer, case in [(l, c) for l in (small, ref) for c in CASES]:
        ids = stages[f"{case}.input_ids"]
        out = layer.forward(ids, stages[f"{case}.hidden_states"], all_stages=True)
        np.testing.assert_array_equal(out["hash_ids"], stages[f"{case}.hash_ids"])
        kept = ["gated_value", "short_conv"] + (["embeddings", "value", "keys"] if layer is ref else [])
        assert all(k in out for k in kept), sorted(out)
        for name in ["gates", "output"] + kept:
            key = f"{case}.{name}"
            if key in stages:
                np.testing.assert_allclose(out[name], stages[key], atol=1e-4, rtol=0, err_msg=key)
        assert out["output"].dtype == np.float32 and out["output"].shape == stages[f"{case}.output"].shape


def test_non_contiguous_and_other_dtypes_are_converted(small, stages):
    ids = stages["batch2.input_ids"]
    h = stages["batch2.hidden_states"]
    want = small.forward(ids, h)["output"]
    # A Fortran-ordered copy (non-contiguous view of the same values) and int32 ids / float64 hidden.
    got = small.forward(ids.astype(np.int32), np.asfortranarray(h.astype(np.float64)))["output"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # A misaligned float32 view (offset 1 byte into a buffer): the wrapper copies it to an
    # aligned array; the binding itself refuses it rather than reading it unaligned.
    raw = np.zeros(h.nbytes + 1, np.uint8)
    raw[1:] = h.reshape(-1).view(np.uint8)
    odd = np.frombuffer(raw.data, np.float32, count=h.size, offset=1).reshape(h.shape)
    assert not odd.flags.aligned
    np.testing.assert_array_equal(small.forward(ids, odd)["output"], want)
    with pytest.raises(ValueError, match="aligned"):
        small._layer.forward(ids, odd, None, False, False)


def test_streaming_equals_one_shot(small, stages):
    ids = stages["long.input_ids"][0]
    h = stages["long.hidden_states"][0]
    whole = small.forward(ids[None], h[None])["output"][0]
    st = small.new_state()
    parts, at = [], 0
    for n in [1, 40, 7, 89]:
        parts.append(small.forward_chunk(st, ids[at : at + n], h[at : at + n])["output"])
        at += n
    assert st.position == len(ids)
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)
    # A pickled state continues exactly like the original.
    st2 = small.new_state()
    small.forward_chunk(st2, ids[:50], h[:50])
    st3 = pickle.loads(pickle.dumps(st2))
    a = small.forward_chunk(st2, ids[50:], h[50:])["output"]
    b = small.forward_chunk(st3, ids[50:], h[50:])["output"]
    np.testing.assert_array_equal(a, b)


def test_ragged_batch_and_state_files(small, stages, tmp_path):
    ids = stages["batch2.input_ids"]
    h = stages["batch2.hidden_states"]
    want = small.forward(ids, h)["output"]
    states = [small.new_state(), small.new_state()]
    out = small.forward_ragged(states, ids.reshape(-1), h.reshape(-1, 4, 1024), [0, 12, 24])["output"]
    np.testing.assert_allclose(out.reshape(want.shape), want, atol=1e-5)
    states[0].save(tmp_path / "s.bin")  # a pathlib.Path or a str
    back = engram.State.load(str(tmp_path / "s.bin"))
    assert back.position == 12 and pickle.dumps(back) == pickle.dumps(states[0])


def test_state_files_positions_and_empty_inputs_are_refused_by_name(small, stages, tmp_path):
    ids, h = stages["long.input_ids"][0][:10], stages["long.hidden_states"][0][:10]
    st = small.new_state()
    small.forward_chunk(st, ids, h)
    # A path in a folder that does not exist names that path, not the temporary file.
    missing = tmp_path / "no-such-folder" / "s.bin"
    with pytest.raises(ValueError, match=r"output .*no-such-folder/s\.bin: expected a path in an existing folder") as e:
        st.save(missing)
    assert "engram-tmp" not in str(e.value)
    # A position at or past 2^63 (the CLI's int64) is refused, as the CLI's state files do.
    b = bytearray(st.__getstate__())
    b[1:9] = (2**63).to_bytes(8, "little")
    with pytest.raises(ValueError, match=r"state: position: expected a position below 2\^63, found 9223372036854775808"):
        engram.State(bytes(b))
    # An empty sequence to hash, as to forward; empty offsets say what is missing.
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[B, L\] with B, L >= 1, found \[1, 0\]"):
        engram.hash({}, np.zeros((1, 0), dtype=np.int64))
    with pytest.raises(ValueError, match=r"offsets: expected S\+1 >= 2 values .* found none"):
        small.forward_ragged([small.new_state()], ids, h, [])


def test_a_state_runs_only_on_its_own_layer(small, stages, golden):
    import json

    cfg = json.loads((golden / "small.config.json").read_text())
    cfg["layer_id"] = 1  # same shapes as `small` (layer 15), another layer
    other = engram.Engram.torch_default(cfg, 0)
    ids, h = stages["long.input_ids"][0][:10], stages["long.hidden_states"][0][:10]
    st = small.new_state()
    small.forward_chunk(st, ids, h)
    for s in [st, pickle.loads(pickle.dumps(st))]:
        with pytest.raises(ValueError, match=r"states\[0\]: expected a state of this layer \(demo layer 1 .*found a state of another layer"):
            other.forward_chunk(s, ids, h)
    assert st.position == 10  # untouched by the refused call
    # Bytes pickled before states carried their layer end after the conv history; a key of
    # an unknown version counts as none. Such a state runs on any layer of its shape; the
    # first call that succeeds makes it that layer's (a failed one does not).
    b = st.__getstate__()
    k = next(k for k in range(1, 4096) if int.from_bytes(b[-k - 8 : -k], "little") == k)
    assert b[-k:].startswith(b"engram-state-owner/1:")
    future = b[:-k] + b"engram-state-owner/9:" + b[-k + 21 :]
    for unowned in [b[: -k - 8], future]:
        old = engram.State(unowned)
        bad = ids.copy()
        bad[3] = 1 << 40  # refused by the engine, after the states were lent to it
        with pytest.raises(ValueError, match="input_ids"):
            other.forward_chunk(old, bad, h)
        assert old.position == 10
        small.forward_chunk(old, ids, h)  # still unowned: it runs, and is now small's
        assert old.position == 20
        with pytest.raises(ValueError, match=r"this layer \(demo layer 1 "):
            other.forward_chunk(old, ids, h)
    for junk in [b + b"x", b[:-1], b[: -k - 3]]:
        with pytest.raises(ValueError, match="not a state written by engram"):
            engram.State(junk)


def test_tokenize_compression_and_hash(golden):
    comp = read_safetensors(golden / "compression_deepseek_v3.safetensors")["lookup"]
    np.testing.assert_array_equal(engram.compression_table(), comp)
    g = read_safetensors(golden / "hashing_full_config.safetensors")
    h = engram.hash({}, g["seed_text.input_ids"])
    np.testing.assert_array_equal(h[1], g["seed_text.hash.layer1"])
    np.testing.assert_array_equal(h[15], g["seed_text.hash.layer15"])
    ids = engram.tokenize("Only Alexander the Great could tame the horse Bucephalus.")
    assert ids[0] == 0 and ids.dtype == np.int64
    assert engram.tokenize("hi", bos=False)[0] != 0


def test_v41_layer_through_numpy(golden, tmp_path):
    v = golden / "v41"
    cases = read_safetensors(v / "v41_small.cases.safetensors")
    # Hashes with a tokenizer given as a file (here the bundled one, unpacked): the same ids.
    import gzip
    from pathlib import Path

    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(gzip.decompress((Path(__file__).parents[2] / "engram/assets/deepseek-v3-tokenizer.json.gz").read_bytes()))
    bundled = engram.hash(v / "v41_small.config.json", cases["input_ids"])
    given = engram.hash(v / "v41_small.config.json", cases["input_ids"], tokenizer=tok)
    assert sorted(given) == [1, 14]
    for layer in [1, 14]:
        np.testing.assert_array_equal(given[layer], bundled[layer])
    with pytest.raises(ValueError):
        engram.hash(v / "v41_small.config.json", cases["input_ids"], tokenizer=tmp_path / "missing.json")
    mask = cases["token_mask"].astype(bool)
    for layer in [1, 14]:
        l = engram.Engram.load(v / "v41_small.config.json", v / "v41_small.weights.safetensors", layer=layer)
        assert l.variant == "deepseek-v4.1"
        out = l.forward(cases["input_ids"], cases["hidden_states"], token_mask=mask, all_stages=True)
        np.testing.assert_array_equal(out["hash_ids"], cases[f"l{layer}.hash_ids"])
        np.testing.assert_array_equal(out["embeddings"], cases[f"l{layer}.embeddings"])
        np.testing.assert_array_equal(out["kv"], cases[f"l{layer}.kv"])
        np.testing.assert_allclose(out["gates"], cases[f"l{layer}.gates"], atol=1e-3)
        # f32 output (NumPy float32 in): within bf16 rounding of the bf16 reference output.
        np.testing.assert_allclose(out["output"], cases[f"l{layer}.output"], rtol=2 ** -7, atol=1e-6)
    assert np.all(out["gates"][~mask] == 0)


def test_errors_are_python_exceptions(small, stages, golden, tmp_path):
    ids = stages["batch2.input_ids"]
    h = stages["batch2.hidden_states"]
    with pytest.raises(ValueError, match="hidden_states"):
        small.forward(ids, h[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        small.forward(ids[0], h)
    bad = h.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="hidden_states"):
        small.forward(ids, bad)
    big = ids.copy()
    big[0, 0] = 10**9
    with pytest.raises(ValueError, match="input_ids"):
        small.forward(big, h)
    with pytest.raises(ValueError, match="token_mask"):
        small.forward(ids, h, token_mask=np.ones(ids.shape, bool))
    with pytest.raises(ValueError, match="expected int64"):
        small.forward(ids.astype(np.float32), h)
    with pytest.raises(OSError):
        engram.Engram.load(golden / "small.config.json", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="hidden_size"):
        engram.Engram.load({"hidden_size": -3}, golden / "small.weights.safetensors")
    with pytest.raises(ValueError, match="layer"):
        engram.Engram.load(golden / "v41" / "v41_small.config.json", golden / "v41" / "v41_small.weights.safetensors")
    with pytest.raises(ValueError, match="threads"):
        engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors", threads=0)
    # A demo layer's `layer` is one of its config's layer_ids, named as the argument.
    with pytest.raises(ValueError, match=r"layer: expected one of the config's layer_ids \[1, 15\], found 7"):
        engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors", layer=7)
    with pytest.raises(ValueError, match="config"):
        engram.Engram.load(42, golden / "small.weights.safetensors")
    with pytest.raises(ValueError, match="state"):
        engram.State(b"\x07garbage")
    st = small.new_state()
    with pytest.raises(ValueError, match="twice"):
        small.forward_ragged([st, st], ids.reshape(-1), h.reshape(-1, 4, 1024), [0, 12, 24])
    assert st.position == 0
    # Still works after all that.
    assert small.forward(ids, h)["output"].shape == (2, 12, 4, 1024)


def test_the_gil_is_released_while_the_engine_computes(small):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 128000, size=(1, 3000), dtype=np.int64)
    h = rng.standard_normal((1, 3000, 4, 1024), dtype=np.float32)
    done = threading.Event()
    spins = 0

    def work():
        for _ in range(3):
            small.forward(ids, h)
        done.set()

    t = threading.Thread(target=work)
    t0 = last = time.perf_counter()
    gap = 0.0
    t.start()
    while not done.is_set():
        spins += 1  # runs only while the worker does not hold the GIL
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    t.join()
    elapsed = time.perf_counter() - t0
    assert elapsed > 0.05, "the work must take a while for this test to mean anything"
    assert spins > 10_000, f"the main thread ran {spins} iterations in {elapsed:.2f}s: the GIL was held"
    # Were the GIL held through a call, the main thread would stop for the whole call; a
    # released GIL leaves it only the OS scheduler's pauses (milliseconds).
    assert gap < 0.75 * elapsed / 3, f"the main thread stopped for {gap:.3f}s of calls taking {elapsed / 3:.3f}s each"


def test_concurrent_calls_on_one_layer_keep_their_inputs_apart(small, stages):
    # One call holds the layer's input buffer; a concurrent call copies into its own.
    ids = stages["long.input_ids"]
    h = stages["long.hidden_states"]
    h2 = (h * 0.5).astype(np.float32)
    want = [small.forward(ids, x)["output"] for x in (h, h2)]
    got = [[], []]

    def work(k, x):
        for _ in range(6):
            got[k].append(small.forward(ids, x)["output"])

    ts = [threading.Thread(target=work, args=(k, x)) for k, x in enumerate((h, h2))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in range(2):
        assert len(got[k]) == 6
        for g in got[k]:
            np.testing.assert_array_equal(g, want[k])


def test_a_state_in_use_cannot_be_saved(small):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 128000, size=3000, dtype=np.int64)
    h = rng.standard_normal((3000, 4, 1024), dtype=np.float32)
    st = small.new_state()
    t = threading.Thread(target=lambda: small.forward_ragged([st], ids, h, [0, 3000]))
    t.start()
    seen = False
    while t.is_alive() and not seen:
        seen = "in use" in repr(st)
    assert seen, "the call (3000 tokens) ended before the main thread saw its state lent"
    with pytest.raises(ValueError, match="in use"):
        pickle.dumps(st)
    t.join()
    assert st.position == 3000
    pickle.loads(pickle.dumps(st))  # after the call it pickles again


def test_no_leak_over_many_calls(small, stages):
    ids = stages["seed_text.input_ids"]
    h = stages["seed_text.hidden_states"]
    for _ in range(50):
        small.forward(ids, h)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(1000):
        small.forward(ids, h)
        st = small.new_state()
        small.forward_chunk(st, ids[0], h[0])
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kb < 64 * 1024, f"peak RSS grew by {grown_kb} KiB over 1,000 calls"


def test_v41_inputs_whose_shapes_only_add_up_are_refused(golden):
    v = golden / "v41"
    cases = read_safetensors(v / "v41_small.cases.safetensors")
    l = engram.Engram.load(v / "v41_small.config.json", v / "v41_small.weights.safetensors", layer=1)
    ids, h = cases["input_ids"], cases["hidden_states"]
    mask = cases["token_mask"].astype(bool)
    with pytest.raises(ValueError, match="token_mask"):
        l.forward(ids, h, token_mask=mask.T.copy())
    with pytest.raises(ValueError, match="token_mask"):
        l.forward(ids, h, token_mask=mask.reshape(-1))
    # A failing ragged call leaves every state as it was.
    s0, s1 = l.new_state(), l.new_state()
    bad = ids.reshape(-1).copy()
    bad[-1] = 10**7
    with pytest.raises(ValueError, match="sequence 1"):
        l.forward_ragged([s0, s1], bad, h.reshape(60, 4, 256), [0, 30, 60])
    assert s0.position == 0 and s1.position == 0
    with pytest.raises(ValueError, match="input_ids"):
        l.forward(np.full_like(ids, -(2**63)), h)
    with pytest.raises(ValueError, match="dtype"):
        engram.Engram.load(v / "v41_small.config.json", v / "v41_small.weights.safetensors", layer=1, dtype="bf16")
    with pytest.raises(ValueError, match="layer"):
        engram.Engram.load(v / "v41_small.config.json", v / "v41_small.weights.safetensors", layer=-1)
    with pytest.raises(ValueError, match="below 2\\^63"):
        l.forward(np.full(ids.shape, 2**63 + 5, dtype=np.uint64), h)


def test_row_stores_give_the_same_outputs(small, stages, golden):
    ids, h = stages["long.input_ids"], stages["long.hidden_states"]
    want = small.forward(ids, h)["output"]
    for io, cache, policy in [("direct", None, None), ("direct", "4k", "lru"), ("mmap", 1024, "clock"), ("ram", "1k", "s3fifo")]:
        l = engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors", table_io=io, table_cache=cache, table_cache_policy=policy)
        np.testing.assert_array_equal(l.forward(ids, h)["output"], want)
    with pytest.raises(ValueError, match="table-cache-policy"):
        engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors", table_cache="1k", table_cache_policy="fifo")
    with pytest.raises(ValueError, match="table-io"):
        engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors", table_io="disk")
    # Options that do nothing without another are refused, as the CLI refuses its flags.
    for kw, what in [
        (dict(table_cache_policy="lru"), "table_cache_policy"),
        (dict(io_depth=8), "io_depth"),
        (dict(table_io="direct", io_depth=100_000), "1 to 1024"),
        (dict(table_cache=0), "above 0"),
        (dict(path="reference", dtype="bf16"), "fused path"),
        (dict(table_store="redis://127.0.0.1:1", table_io="ram"), "table_store"),
    ]:
        with pytest.raises(ValueError, match=what):
            engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors", **kw)
    v = golden / "v41"
    cases = read_safetensors(v / "v41_small.cases.safetensors")
    a = engram.Engram.load(v / "v41_small.config.json", v / "v41_small.weights.safetensors", layer=14)
    b = engram.Engram.load(v / "v41_small.config.json", v / "v41_small.weights.safetensors", layer=14, table_io="direct", table_cache="1k")
    np.testing.assert_array_equal(a.forward(cases["input_ids"], cases["hidden_states"])["output"], b.forward(cases["input_ids"], cases["hidden_states"])["output"])


def test_rows_from_a_redis_cluster(small, stages, golden):
    # Needs a cluster (ENGRAM_REDIS_CLUSTER; CI starts one and sets ENGRAM_REQUIRE_REDIS=1)
    # and the CLI to push the table (target/release/engram, or ENGRAM_BIN).
    import os
    import subprocess

    url = os.environ.get("ENGRAM_REDIS_CLUSTER")
    if not url:
        assert os.environ.get("ENGRAM_REQUIRE_REDIS") != "1", "ENGRAM_REQUIRE_REDIS=1 but ENGRAM_REDIS_CLUSTER is not set"
        pytest.skip("no Redis Cluster (set ENGRAM_REDIS_CLUSTER=redis://HOST:PORT)")
    from conftest import ROOT

    cli = os.environ.get("ENGRAM_BIN") or str(ROOT / "target" / "release" / "engram")
    cfg, w = golden / "small.config.json", golden / "small.weights.safetensors"
    subprocess.run([cli, "table", "push", "--weights", str(w), "--config", str(cfg), "--store", url], check=True, capture_output=True)
    ids, h = stages["long.input_ids"], stages["long.hidden_states"]
    want = small.forward(ids, h)["output"]
    for cache in [None, "1k", "1M"]:
        l = engram.Engram.load(cfg, w, table_store=url, table_cache=cache)
        np.testing.assert_array_equal(l.forward(ids, h)["output"], want)
    # A table the store does not hold (one byte of the table changed: another digest, so
    # another name in the store): refused at load.
    import json
    import struct
    import tempfile

    b = bytearray(w.read_bytes())
    n = struct.unpack("<Q", b[:8])[0]
    start = json.loads(b[8 : 8 + n])["multi_head_embedding.embedding.weight"]["data_offsets"][0]
    b[8 + n + start] ^= 1
    with tempfile.TemporaryDirectory() as d:
        other = pathlib.Path(d) / "other.safetensors"
        other.write_bytes(bytes(b))
        with pytest.raises(ValueError, match="holds no table"):
            engram.Engram.load(cfg, other, table_store=url)


def test_unknown_tuning_env_value_is_refused_at_load(golden, monkeypatch):
    # Unchecked, the kernels would run their default tile silently.
    monkeypatch.setenv("ENGRAM_TILE", "sixty-four")
    with pytest.raises(ValueError, match=r'^environment variable ENGRAM_TILE: expected a whole number of rows from 1 to 65536, found "sixty-four"$'):
        engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors")
    monkeypatch.setenv("ENGRAM_TILE", "16")
    engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors")
