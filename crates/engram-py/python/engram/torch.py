"""``EngramModule``: a stand-in for the reference's ``Engram`` nn.Module (inference only).

>>> import torch, engram.torch
>>> torch.manual_seed(42)
>>> m = engram.torch.EngramModule(config, layer_id=1)   # the reference's field names
>>> m.load_state_dict(reference_module.state_dict())     # the reference's state-dict names
>>> out = m(hidden_states, input_ids)                    # == reference_module(hidden_states, input_ids)

The weights live in the module as tensors under the reference's names, so ``state_dict`` /
``load_state_dict`` interchange with the reference module; the forward runs in the Rust
engine (rebuilt from the tensors whenever they change). Gradients are not computed: inputs
that require grad are refused.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch

from . import _engram

__all__ = ["EngramModule"]


def _set(root: torch.nn.Module, dotted: str, value: torch.Tensor, buffer: bool) -> None:
    *path, leaf = dotted.split(".")
    m = root
    for p in path:
        if not hasattr(m, p):
            m.add_module(p, torch.nn.Module())
        m = getattr(m, p)
    if buffer:
        m.register_buffer(leaf, value)
    else:
        m.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))


class EngramModule(torch.nn.Module):
    """The reference's ``Engram(layer_id)`` with the config given as a dict (the reference's
    field names; omitted fields take the reference's defaults). Initial weights are PyTorch's
    default initialisation for ``seed`` (default ``torch.initial_seed()``, i.e. what the
    reference creates right after ``torch.manual_seed``; the global generator is not
    advanced)."""

    def __init__(self, config: Optional[Dict[str, Any]] = None, layer_id: int = 1, *, seed: Optional[int] = None, path: str = "fused") -> None:
        super().__init__()
        cfg = dict(config or {})
        cfg["layer_id"] = int(layer_id)
        self._config_json = json.dumps(cfg)
        self._path = path
        seed = torch.initial_seed() if seed is None else int(seed)
        base = _engram.torch_default(self._config_json, False, seed, "f32", path, None)
        for name, arr in _engram.state_dict(base).items():
            _set(self, name, torch.from_numpy(arr), buffer=name.endswith("offsets"))
        self._engine = base
        self._key = self._signature()

    def _signature(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.state_dict(keep_vars=True).values())

    def _layer(self) -> "_engram.Layer":
        key = self._signature()
        if key != self._key:
            # The engine computes in f32: weights held in bf16/f16/f64 (after .to(dtype),
            # .half(), .double()) are read as f32 (exact for bf16 and f16).
            tensors = {
                n: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous().numpy()
                for n, t in self.state_dict().items()
            }
            self._engine = _engram.from_state_dict(self._config_json, tensors, self._path, None)
            self._key = key
        return self._engine

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` [B, L, HC, D], ``input_ids`` [B, L] -> output [B, L, HC, D] (the
        module's return value, before the block's residual), in the hidden states' dtype and
        on their device (the engine itself runs on the CPU)."""
        for name, t in (("hidden_states", hidden_states), ("input_ids", input_ids)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
            if t.requires_grad:
                raise ValueError(f"{name}: EngramModule is inference only (no gradients); pass a tensor without requires_grad")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids: expected an integer tensor, found {input_ids.dtype}")
        dtype = hidden_states.dtype
        h = hidden_states.detach().to("cpu", torch.float32).contiguous().numpy()
        ids = input_ids.detach().to("cpu", torch.int64).contiguous().numpy()
        out = self._layer().forward(ids, h, None, False, False)["output"]
        return torch.from_numpy(out).to(hidden_states.device, dtype)
