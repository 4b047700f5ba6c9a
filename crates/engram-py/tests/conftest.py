import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "testdata" / "golden"


@pytest.fixture(scope="session")
def golden():
    return GOLDEN


def read_safetensors(path):
    """{name: numpy array} of a safetensors file (f32, bf16 widened, i64, u8), no extra deps."""
    import json
    import struct

    import numpy as np

    b = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        raw = b[base + s : base + e]
        dt = info["dtype"]
        if dt == "F32":
            a = np.frombuffer(raw, dtype=np.float32)
        elif dt == "BF16":
            a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt == "I64":
            a = np.frombuffer(raw, dtype=np.int64)
        elif dt == "U8":
            a = np.frombuffer(raw, dtype=np.uint8)
        else:
            continue
        out[name] = a.reshape(info["shape"])
    return out


@pytest.fixture(scope="session")
def stages(golden):
    return read_safetensors(golden / "small.stages.safetensors")


@pytest.fixture(scope="session")
def small(golden):
    import engram

    return engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors")
