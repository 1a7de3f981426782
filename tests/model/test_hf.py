"""The transformers drop-in: GPT-2 (MHA) and a Llama-style GQA model give the logits of HF's eager
attention when run with attn_implementation="pytorch_mqa"; unsupported masks fall back to SDPA."""

import copy
import warnings

import pytest
import torch

from model_helpers import randomize_, tiny_hf_gpt2

transformers = pytest.importorskip("transformers")

import pytorch_mqa.model.hf as mqa_hf  # noqa: E402

IDX = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert mqa_hf.register_hf_attention() == "pytorch_mqa"


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls reaching pytorch_mqa.attention through the drop-in."""
    calls = []
    real = mqa_hf.attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw["causal"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mqa_hf, "attention", spy)
    return calls


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, 0.2)
    return model


def pair(model):
    """(the model on pytorch_mqa attention, a copy on HF eager attention)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    model.set_attn_implementation("pytorch_mqa")
    assert model.config._attn_implementation == "pytorch_mqa"
    return model, eager


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("which", ["gpt2", "llama_gqa"])
def test_logits_and_greedy_generation_match_eager(which, op_calls):
    model, eager = pair(tiny_hf_gpt2() if which == "gpt2" else tiny_llama())
    with torch.no_grad():
        assert max_diff(model(IDX).logits, eager(IDX).logits) <= 1e-4
    n_layer = model.config.num_hidden_layers
    assert len(op_calls) == n_layer and all(causal for _, _, causal in op_calls)
    if which == "llama_gqa":
        assert op_calls[0][0] == (2, 11, 8, 8) and op_calls[0][1] == (2, 11, 2, 8)  # K/V not repeated
    prompt = IDX[:1, :5]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    ours, ref = model.generate(prompt, **kw), eager.generate(prompt, **kw)
    assert ours.tolist() == ref.tolist()
    assert any(q[1] == 1 for q, _, _ in op_calls)  # cached decode steps went through the op too


def test_padding_mask_falls_back_to_sdpa(op_calls):
    model, eager = pair(tiny_llama())
    mask = torch.ones_like(IDX)
    mask[0, :3] = 0  # left padding
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(IDX, attention_mask=mask).logits
    assert any("falling back to SDPA" in str(w.message) for w in caught)
    assert not op_calls
    with torch.no_grad():
        ref = eager(IDX, attention_mask=mask).logits
    assert max_diff(got[1], ref[1]) <= 1e-4 and max_diff(got[0, 3:], ref[0, 3:]) <= 1e-4


def test_strict_refuses_masks_it_cannot_express():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 1, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0] = False
    with pytest.raises(mqa_hf.UnsupportedMaskError, match="not plain causal"):
        mqa_hf.pytorch_mqa_attention_forward(torch.nn.Module(), q, k, k, mask, strict=True)


@pytest.mark.parametrize("causal", [True, False])
def test_explicit_masks_map_to_the_op(causal, op_calls):
    """A boolean or additive mask equal to the causal (or full) pattern runs the op, not SDPA."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    vis = torch.ones(5, 7, dtype=torch.bool)
    if causal:
        vis = torch.arange(7)[None, :] <= torch.arange(5)[:, None] + 2
    bool_mask = vis.expand(2, 1, 5, 7)
    float_mask = torch.zeros(2, 1, 5, 7).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=bool_mask)
    for mask in (bool_mask, float_mask):
        out, weights = mqa_hf.pytorch_mqa_attention_forward(torch.nn.Module(), q, k, v, mask, scaling=None)
        assert weights is None and out.shape == (2, 5, 4, 8)
        torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert [c for _, _, c in op_calls] == [causal, causal]
