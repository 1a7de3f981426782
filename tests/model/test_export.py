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


def test_untied_head_loads_saves_and_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          tie_embeddings=False)).eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    torch.nn.init.normal_(model.lm_head.weight)
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        want = model(x)
    # The from-scratch layout with its own out_head (the tutorial's fine-tuned checkpoints).
    save_scratch(model, str(tmp_path / "scratch"))
    back = GPT.from_pretrained(str(tmp_path / "scratch" / "model.pth"), n_head=4, n_kv_head=2)
    assert back.config.tie_embeddings is False
    # Our own format keeps the head; a Hugging Face directory says tie_word_embeddings false.
    back.save_pretrained(str(tmp_path / "ours"))
    again = GPT.from_pretrained(str(tmp_path / "ours"))
    model.save_pretrained(str(tmp_path / "hf"), format="hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    from_hf = GPT.from_pretrained(str(tmp_path / "hf"), n_kv_head=2)
    with torch.no_grad():
        for got in (back(x), again(x), hf(x).logits, from_hf(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert again.config.tie_embeddings is False and from_hf.config.tie_embeddings is False
    with pytest.raises(ValueError, match="format"):
        model.save_pretrained(str(tmp_path / "x"), format="onnx")


def test_tied_checkpoints_stay_tied(tmp_path):
    model = _model(1)
    model.save_pretrained(str(tmp_path / "hf"), format="hf")
    back = GPT.from_pretrained(str(tmp_path / "hf"), n_kv_head=1)
    assert back.config.tie_embeddings and back.lm_head.weight is back.transformer.wte.weight


def test_bare_state_dict_needs_n_head_and_infers_kv_heads(tmp_path):
    model = _model(2)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="n_head"):
        GPT.from_pretrained(str(path))
    back = GPT.from_pretrained(str(path), n_head=4)
    assert (back.config.n_head, back.config.n_kv_head) == (4, 2)
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_head"):
        GPT.from_pretrained(str(path), n_head=3)
