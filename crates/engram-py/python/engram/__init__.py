"""DeepSeek's Engram layer, exact and fast: the Rust engine behind a small Python API.

>>> import engram, numpy as np
>>> layer = engram.Engram.load("small.config.json", "small.weights.safetensors")
>>> ids = engram.tokenize("Only Alexander the Great could tame the horse Bucephalus.")[None, :]
>>> hidden = np.random.default_rng(0).standard_normal((1, ids.shape[1], 4, 1024), dtype=np.float32)
>>> out = layer.forward(ids, hidden)            # dict: hash_ids, gates, output
>>> out["output"].shape
(1, 14, 4, 1024)

Inputs are NumPy arrays or PyTorch CPU tensors (outputs then come back as tensors); the
engine releases the GIL while it computes. Bad input raises ``ValueError`` (``OSError`` for
files) with the engine's one-line message.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _engram
from ._engram import State

__all__ = ["Engram", "State", "tokenize", "compression_table", "hash"]

Config = Union[str, "os.PathLike[str]", Dict[str, Any]]


def _config(config: Config) -> Tuple[str, bool]:
    """(JSON text or path, is_path)."""
    if isinstance(config, dict):
        return json.dumps(config), False
    if isinstance(config, (str, os.PathLike)):
        return os.fspath(config), True
    raise ValueError(f"config: expected a path or a dict, found {type(config).__name__}")


def _is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "numpy") and hasattr(x, "requires_grad")


def _count(x: Any, name: str, low: int) -> Optional[int]:
    """An optional integer argument >= `low`, as a ValueError otherwise."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or int(x) < low or int(x) >= 2**63:
        raise ValueError(f"{name}: expected an integer >= {low}, found {x!r}")
    return int(x)


def _threads(x: Any) -> Optional[int]:
    """``threads``: an integer >= 1, capped (with a warning) at 4 x the cores, as the CLI does."""
    n = _count(x, "threads", 1)
    cores = os.cpu_count() or 1
    if n is not None and n > 4 * cores:
        warnings.warn(f"threads={n} capped at {4 * cores} (4 x the {cores} cores)", stacklevel=3)
        n = 4 * cores
    return n


def _array(x: Any, name: str, dtype: Any) -> Tuple[np.ndarray, bool]:
    """A contiguous array of `dtype` (no copy when it already is one); whether it was bf16."""
    if type(x) is np.ndarray and x.dtype == dtype and x.flags.c_contiguous and x.flags.aligned:
        return x, False  # the common case (the engine copies it before it releases the GIL)
    bf16 = False
    if _is_torch(x):
        import torch

        if x.requires_grad:
            raise ValueError(f"{name}: the engine is inference only; pass a tensor without requires_grad (use .detach())")
        if x.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, found one on {x.device}")
        if x.dtype == torch.bfloat16:
            bf16 = True
            x = x.float()
        x = x.contiguous().numpy()
    a = np.asarray(x)
    if dtype is np.bool_:
        if a.dtype not in (np.bool_, np.uint8):
            raise ValueError(f"{name}: expected bool or uint8, found {a.dtype}")
        return np.ascontiguousarray(a != 0), bf16
    if a.dtype != dtype:
        kind_ok = (dtype == np.int64 and a.dtype.kind in "iu") or (dtype == np.float32 and a.dtype.kind == "f")
        if not kind_ok:
            raise ValueError(f"{name}: expected {np.dtype(dtype).name}, found {a.dtype}")
        if a.dtype.kind == "u" and a.size and a.max() >= 2**63:
            raise ValueError(f"{name}: expected values below 2^63, found {a.max()}")
        a = a.astype(dtype)
    return np.require(a, requirements="CA"), bf16


def _out(d: Dict[str, np.ndarray], torch_in: bool, bf16: bool) -> Dict[str, Any]:
    if not torch_in:
        return d
    import torch

    res = {k: torch.from_numpy(v) for k, v in d.items()}
    if bf16:
        for k in ("output", "embeddings", "kv"):
            if k in res:
                res[k] = res[k].to(torch.bfloat16)
    return res


class Engram:
    """One Engram layer: the demo variant (``engram_demo_v1.py``) or a DeepSeek-V4.1 layer."""

    def __init__(self, layer: "_engram.Layer") -> None:
        self._layer = layer

    @classmethod
    def load(
        cls,
        config: Config,
        weights: Union[str, "os.PathLike[str]"],
        *,
        layer: Optional[int] = None,
        dtype: str = "f32",
        path: str = "fused",
        tokenizer: Optional[str] = None,
        threads: Optional[int] = None,
        table_io: str = "mmap",
        table_cache: Optional[Union[int, str]] = None,
        table_cache_policy: Optional[str] = None,
        io_depth: Optional[int] = None,
        table_store: Optional[str] = None,
    ) -> "Engram":
        """Loads a layer. ``config``: a path or a dict (the reference's field names, or a
        DeepSeek-V4.1 model config, recognised by ``engram_layer_ids``; ``layer`` picks the
        layer). ``weights``: a state-dict safetensors file, or a V4.1 checkpoint (file or
        sharded folder). ``dtype``: "f32" or "bf16" (demo fused path); ``path``: "fused" or
        "reference"; ``tokenizer``: a tokenizer.json or folder; ``threads``: worker threads;
        ``table_io``: "mmap", "ram" (copied into memory) or "direct" (rows read on demand
        with O_DIRECT, ``io_depth`` reads in flight, 64 by default); ``table_cache``: a
        hot-row cache in front of the table, in bytes or like "512M", evicting by
        ``table_cache_policy`` ("s3fifo", the default, "clock" or "lru"). Outputs do not depend on where
        the rows live. ``table_store``: ``"redis://HOST:PORT"`` of a Redis Cluster holding
        the table (written by ``engram table push``)."""
        c, is_path = _config(config)
        layer, threads = _count(layer, "layer", 0), _threads(threads)
        cache = None if table_cache is None else str(table_cache)
        io_depth = _count(io_depth, "io_depth", 1)
        # The CLI's rules for its --table-* flags.
        if table_store is not None and table_io not in (None, "mmap"):
            raise ValueError(f"table_store: rows come from the store; expected no table_io with it, found {table_io!r}")
        if table_cache_policy is not None and cache is None:
            raise ValueError("table_cache_policy: expected table_cache=SIZE with it, found none")
        if io_depth is not None and table_io != "direct":
            raise ValueError(f"io_depth: expected table_io='direct' with it, found {table_io!r}")
        return cls(_engram.load(c, is_path, os.fspath(weights), layer, dtype, path, tokenizer, threads, table_io, cache, table_cache_policy, io_depth, table_store))

    @classmethod
    def torch_default(cls, config: Config, seed: int, *, dtype: str = "f32", path: str = "fused", threads: Optional[int] = None) -> "Engram":
        """The demo layer with the weights PyTorch creates after ``torch.manual_seed(seed)``."""
        c, is_path = _config(config)
        seed, threads = _count(seed, "seed", 0), _threads(threads)
        return cls(_engram.torch_default(c, is_path, seed, dtype, path, threads))

    @property
    def variant(self) -> str:
        """"demo" or "deepseek-v4.1"."""
        return self._layer.variant

    @property
    def last_engine_seconds(self) -> float:
        """Seconds the engine itself spent in the last call."""
        return self._layer.last_engine_seconds

    def forward(self, input_ids: Any, hidden_states: Any, *, token_mask: Any = None, all_stages: bool = False) -> Dict[str, Any]:
        """Fresh sequences: ``input_ids`` int64 [B, L], ``hidden_states`` [B, L, HC, D]
        (float32, or a bf16 torch tensor), ``token_mask`` [B, L] (V4.1: False = dead token).
        Returns ``hash_ids``, ``gates``, ``output``; with ``all_stages`` also ``gated_value`` and
        ``short_conv`` (demo), ``embeddings``/``value``/``keys`` on the reference path, or
        ``embeddings``/``kv`` (V4.1)."""
        torch_in = _is_torch(input_ids) or _is_torch(hidden_states)
        ids, _ = _array(input_ids, "input_ids", np.int64)
        h, bf16 = _array(hidden_states, "hidden_states", np.float32)
        m = None if token_mask is None else _array(token_mask, "token_mask", np.bool_)[0]
        return _out(self._layer.forward(ids, h, m, all_stages, bf16), torch_in, bf16)

    def new_state(self) -> State:
        """The state of a sequence that has not started."""
        return self._layer.new_state()

    def forward_chunk(self, state: State, input_ids: Any, hidden_states: Any, *, token_mask: Any = None) -> Dict[str, Any]:
        """The next ``T`` tokens of one sequence: ``input_ids`` [T], ``hidden_states`` [T, HC, D];
        ``state`` is read and updated."""
        return self.forward_ragged([state], input_ids, hidden_states, [0, len(input_ids)], token_mask=token_mask)

    def forward_ragged(self, states: Sequence[State], input_ids: Any, hidden_states: Any, offsets: Any, *, token_mask: Any = None) -> Dict[str, Any]:
        """Sequence s has rows ``offsets[s]:offsets[s+1]`` of the packed ``input_ids`` [T] and
        ``hidden_states`` [T, HC, D], and its own state (updated)."""
        torch_in = _is_torch(input_ids) or _is_torch(hidden_states)
        ids, _ = _array(input_ids, "input_ids", np.int64)
        h, bf16 = _array(hidden_states, "hidden_states", np.float32)
        # An empty list is float64 to NumPy: say what is missing rather than its dtype.
        if (offsets.numel() if _is_torch(offsets) else np.asarray(offsets).size) == 0:
            raise ValueError("offsets: expected S+1 >= 2 values (each sequence's first row, then T), found none")
        off, _ = _array(offsets, "offsets", np.int64)
        if off.ndim != 1:
            raise ValueError(f"offsets: expected shape [S+1], found {list(off.shape)}")
        m = None if token_mask is None else _array(token_mask, "token_mask", np.bool_)[0]
        return _out(self._layer.forward_ragged(list(states), ids, h, off, m, bf16), torch_in, bf16)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """The demo layer's weights under the reference's state-dict names."""
        return _engram.state_dict(self._layer)

    def __repr__(self) -> str:
        return repr(self._layer)


def tokenize(text: str, bos: bool = True, *, tokenizer: Optional[str] = None) -> np.ndarray:
    """Token ids of ``text`` with the bundled DeepSeek-V3 tokenizer (or ``tokenizer``)."""
    return _engram.tokenize(text, bos, tokenizer)


def compression_table(*, tokenizer: Optional[str] = None) -> np.ndarray:
    """Canonical (compressed) id of every raw token id."""
    return _engram.compression_table(tokenizer)


def hash(config: Config, input_ids: Any, *, tokenizer: Optional[str] = None) -> Dict[int, np.ndarray]:  # noqa: A001 (the reference's name)
    """n-gram hashes of ``input_ids`` [B, L] for every layer of the config: {layer_id: array}.
    Demo configs give hashes before table offsets [B, L, H]; V4.1 configs table row ids.
    ``tokenizer`` (a tokenizer.json or folder) overrides the config's tokenizer (demo) or the
    bundled DeepSeek-V3 one (V4.1: the checkpoint's own tokenizer, for real configs)."""
    c, is_path = _config(config)
    ids, _ = _array(input_ids, "input_ids", np.int64)
    tok = None if tokenizer is None else os.fspath(tokenizer)
    return {int(k): v for k, v in _engram.hash(c, is_path, ids, tok).items()}
