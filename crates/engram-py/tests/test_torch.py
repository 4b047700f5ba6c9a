"""PyTorch tensors in and out, and EngramModule as a drop-in for the reference module."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import engram  # noqa: E402
import engram.torch  # noqa: E402


def test_torch_tensors_in_and_out(small, stages):
    ids = torch.from_numpy(stages["batch2.input_ids"].copy())
    h = torch.from_numpy(stages["batch2.hidden_states"].copy())
    out = small.forward(ids, h)
    assert isinstance(out["output"], torch.Tensor) and out["output"].dtype == torch.float32
    np.testing.assert_allclose(out["output"].numpy(), stages["batch2.output"], atol=1e-4)
    outb = small.forward(ids, h.to(torch.bfloat16))
    assert outb["output"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="inference only"):
        small.forward(ids, h.clone().requires_grad_(True))


def test_engram_module_is_a_drop_in_for_the_reference(golden, stages):
    cfg = {"engram_vocab_size": [1999, 2503], "tokenizer_name_or_path": "deepseek-v3"}
    torch.manual_seed(42)
    m = engram.torch.EngramModule(cfg, layer_id=15)
    names = set(m.state_dict())
    assert "multi_head_embedding.embedding.weight" in names and "short_conv.conv.weight" in names
    # Fresh weights are PyTorch's default initialisation for seed 42.
    ref_init = engram.Engram.torch_default(dict(cfg, layer_id=15), 42).state_dict()
    for k, v in ref_init.items():
        np.testing.assert_array_equal(m.state_dict()[k].numpy(), v, err_msg=k)
    # The reference's state dict loads under its own names; the forward call is the reference's.
    sd = engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors").state_dict()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    for case in ["seed_text", "long"]:
        h = torch.from_numpy(stages[f"{case}.hidden_states"].copy())
        ids = torch.from_numpy(stages[f"{case}.input_ids"].copy())
        out = m(h, ids)
        np.testing.assert_allclose(out.numpy(), stages[f"{case}.output"], atol=1e-4, err_msg=case)
    with pytest.raises(ValueError, match="inference only"):
        m(h.clone().requires_grad_(True), ids)
    with pytest.raises(ValueError, match="integer"):
        m(h, ids.float() + 0.7)


def test_engram_module_in_other_dtypes_reads_its_weights_as_f32(golden, stages):
    cfg = {"engram_vocab_size": [1999, 2503], "tokenizer_name_or_path": "deepseek-v3"}
    m = engram.torch.EngramModule(cfg, layer_id=15)
    sd = engram.Engram.load(golden / "small.config.json", golden / "small.weights.safetensors").state_dict()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    h = torch.from_numpy(stages["seed_text.hidden_states"].copy())
    ids = torch.from_numpy(stages["seed_text.input_ids"].copy())
    want = m(h, ids)
    # bf16 weights: the module's weights change (rounded), the call must run and return bf16.
    mb = engram.torch.EngramModule(cfg, layer_id=15)
    mb.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    mb = mb.to(torch.bfloat16)
    out = mb(h.to(torch.bfloat16), ids)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    # float64 weights hold the same values: the same output, in float64.
    md = engram.torch.EngramModule(cfg, layer_id=15)
    md.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    md = md.double()
    out = md(h.double(), ids)
    assert out.dtype == torch.float64
    np.testing.assert_array_equal(out.float().numpy(), want.numpy())
