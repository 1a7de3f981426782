"""Writing a GPT as a Hugging Face GPT-2 directory and in the from-scratch layout, and reading them back."""

import pytest
import torch

from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.model.export import save_hf, save_scratch, scratch_state_dict


def _model(n_kv_head, bias=True, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                         bias=bias)).eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_transformers_loads_the_hf_directory_with_equal_logits(tmp_path, n_kv_head, bias):
    transformers = pytest.importorskip("transformers")
    model = _model(n_kv_head, bias)
    save_hf(model, str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)
    back = GPT.from_pretrained(str(tmp_path), n_kv_head=n_kv_head)  # repeated KV heads pool back exactly
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_scratch_layout_round_trip(tmp_path, n_kv_head):
    model = _model(n_kv_head)
    sd = scratch_state_dict(model)
    assert sd["trf_blocks.0.att.W_key.weight"].shape == (32, 32) and "out_head.weight" in sd
    save_scratch(model, str(tmp_path / "out"))
    back = GPT.from_pretrained(str(tmp_path / "out" / "model.pth"), n_head=4, n_kv_head=n_kv_head)
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-5)
