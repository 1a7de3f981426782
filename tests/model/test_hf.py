"""The transformers drop-in: GPT-2 (MHA) and a Llama-style GQA model give the logits of HF's eager
attention when run with attn_implementation="pytorch_mqa"; unsupported masks fall back to SDPA."""

import copy
import warnings

import pytest
import torch

from model_helpers import randomize_, tiny_hf_gpt2
from pytorch_mqa.testing.tolerance import atol

transformers = pytest.importorskip("transformers")

import pytorch_mqa.model.hf as mqa_hf  # noqa: E402

IDX = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert mqa_hf.register_hf_attention() == "pytorch_mqa"


@pytest.fixture
def op_calls(monkeypatch):
    """The calls reaching the ops through the drop-in: ("attention", q shape, k shape, causal, window)
    and ("varlen", total_q, causal, max_seqlen_q, window)."""
    calls = []
    real, real_varlen = mqa_hf.attention, mqa_hf.attention_varlen

    def spy(q, k, v, **kw):
        calls.append(("attention", tuple(q.shape), tuple(k.shape), kw["causal"], tuple(kw["window_size"])))
        return real(q, k, v, **kw)

    def spy_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(("varlen", q.shape[0], kw["causal"], max_q, tuple(kw["window_size"])))
        return real_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(mqa_hf, "attention", spy)
    monkeypatch.setattr(mqa_hf, "attention_varlen", spy_varlen)
    return calls


def tiny_llama(seed=0, kv_heads=2, **kw):
    """A random-weight Llama (GQA: 8 query heads, `kv_heads` KV heads) built from its config offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=kv_heads, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    fields.update(kw)
    cfg = LlamaConfig(**fields)
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
    assert len(op_calls) == n_layer and all(c[0] == "attention" and c[3] for c in op_calls)
    if which == "llama_gqa":
        assert op_calls[0][1] == (2, 11, 8, 8) and op_calls[0][2] == (2, 11, 2, 8)  # K/V not repeated
    prompt = IDX[:1, :5]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    ours, ref = model.generate(prompt, **kw), eager.generate(prompt, **kw)
    assert ours.tolist() == ref.tolist()
    assert any(c[1][1] == 1 for c in op_calls)  # cached decode steps went through the op too


def padded_batch(side):
    """IDX with row 0 padded by 3 tokens on `side` and row 1 unpadded: (ids, mask, valid positions of row 0)."""
    mask = torch.ones_like(IDX)
    if side == "left":
        mask[0, :3] = 0
        return IDX, mask, slice(3, None)
    mask[0, -3:] = 0
    return IDX, mask, slice(None, -3)


def no_fallback():
    """A context that turns the SDPA fallback's warning into a failure."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message="pytorch_mqa attention: falling back")
    return ctx


@pytest.mark.parametrize("which", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_runs_varlen_and_matches_eager(which, side, op_calls):
    """A padding mask runs attention_varlen on the unpadded rows (no SDPA fallback); the logits of
    every real token equal HF eager attention's (fp32: DESIGN §5's atol, scaled by the logits)."""
    model, eager = pair(tiny_hf_gpt2() if which == "gpt2" else tiny_llama())
    ids, mask, keep = padded_batch(side)
    ctx = no_fallback()
    try:
        with torch.no_grad():
            got = model(ids, attention_mask=mask).logits
    finally:
        ctx.__exit__(None, None, None)
    n_layer = model.config.num_hidden_layers
    varlen = [c for c in op_calls if c[0] == "varlen"]
    assert len(varlen) == n_layer and all(c[2] for c in varlen)  # causal, one call per layer
    assert varlen[0][1] == 2 * 11 - 3  # the unpadded query rows of the batch, packed
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).logits
    tol = atol(torch.float32) * max(1.0, ref.abs().max().item())
    assert max_diff(got[1], ref[1]) <= tol and max_diff(got[0, keep], ref[0, keep]) <= tol


@pytest.mark.parametrize("which", ["gpt2", "llama_gqa", "llama_mqa"])
def test_padded_generate_greedy_tokens_equal_eager(which, op_calls):
    """HF generate on a left-padded batch (prefill and cached steps under a padding mask)."""
    build = {"gpt2": tiny_hf_gpt2, "llama_gqa": tiny_llama, "llama_mqa": lambda: tiny_llama(kv_heads=1)}[which]
    model, eager = pair(build())
    prompt = IDX[:, :6].clone()
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # row 0: a 4-token prompt, left-padded
    prompt[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ctx = no_fallback()
    try:
        ours = model.generate(prompt, **kw)
    finally:
        ctx.__exit__(None, None, None)
    ref = eager.generate(prompt, **kw)
    assert ours.tolist() == ref.tolist()
    assert any(c[0] == "varlen" and c[3] == 1 for c in op_calls)  # cached decode steps ran varlen (1 query max)
    # and the same prompt alone, unpadded, generates the same tokens as row 0
    alone = eager.generate(prompt[:1, 2:], attention_mask=mask[:1, 2:], max_new_tokens=8, do_sample=False,
                           pad_token_id=0)
    assert ours[0, 2:].tolist() == alone[0].tolist()


def test_strict_refuses_masks_it_cannot_express():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 1, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., 2:, :2] = False  # chunked attention (chunks of 2): no causal, full or padded reading
    with pytest.raises(mqa_hf.UnsupportedMaskError, match="not causal or full attention"):
        mqa_hf.pytorch_mqa_attention_forward(torch.nn.Module(), q, k, k, mask, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = mqa_hf.pytorch_mqa_attention_forward(torch.nn.Module(), q, k, k, mask)
    assert any("falling back to SDPA" in str(w.message) for w in caught) and out.shape == (1, 4, 2, 8)


def test_mask_layout_reads_padding():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    left = causal.clone()
    left[:, :2] = False  # 2 left-padding tokens
    right = causal.clone()
    right[:, 3:] = False  # 2 right-padding tokens: rows 3 and 4 see what row 2 sees
    mask = torch.stack([causal, left, right])[:, None]
    lay = mqa_hf.mask_layout(mask, 3, 5, 5, causal=True)
    assert lay.causal and lay.padded
    assert lay.q_rows.tolist() == [[True] * 5, [False, False, True, True, True], [True, True, True, False, False]]
    assert lay.kv_rows.tolist() == lay.q_rows.tolist()
    assert lay.cu_seqlens_q.tolist() == [0, 5, 8, 11] and lay.cu_seqlens_k.tolist() == [0, 5, 8, 11]
    assert (lay.max_seqlen_q, lay.max_seqlen_k) == (5, 5)
    assert not mqa_hf.mask_layout(causal.expand(2, 1, 5, 5), 2, 5, 5, causal=True).padded
    window = causal & ~torch.ones(5, 5, dtype=torch.bool).tril(-2)  # sliding window of 2
    assert mqa_hf.mask_layout(window[None, None], 1, 5, 5, causal=True) is None  # not without the window
    assert mqa_hf.mask_layout(window[None, None], 1, 5, 5, causal=True, left=1) is not None


def tiny_mistral(sliding_window, seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=sliding_window, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, 0.2)
    return model


@pytest.mark.parametrize("side", [None, "left"])
def test_sliding_window_model_matches_eager(side, op_calls):
    """Mistral's sliding window (4 < T = 11) goes to the op as window_size, padded or not."""
    model, eager = pair(tiny_mistral(4))
    ids, mask, keep = padded_batch(side or "left")
    if side is None:
        mask, keep = torch.ones_like(ids), slice(None)
    ctx = no_fallback()
    try:
        with torch.no_grad():
            got = model(ids, attention_mask=mask).logits
    finally:
        ctx.__exit__(None, None, None)
    assert op_calls and all(c[-1] == (3, -1) for c in op_calls)
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).logits
    tol = atol(torch.float32) * max(1.0, ref.abs().max().item())
    assert max_diff(got[1], ref[1]) <= tol and max_diff(got[0, keep], ref[0, keep]) <= tol
    prompt = ids[:1, :5]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert model.generate(prompt, **kw).tolist() == eager.generate(prompt, **kw).tolist()


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
    assert [c[3] for c in op_calls] == [causal, causal]


def test_gemma2_softcap_scaling_and_window_match_eager(op_calls):
    """Gemma-2: logit softcap, a scaling that is not 1/sqrt(head_dim), sliding and full layers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=5.0,
        final_logit_softcapping=None, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    randomize_(model, 0.2)
    model, eager = pair(model)
    ids, mask, keep = padded_batch("left")
    ctx = no_fallback()
    try:
        with torch.no_grad():
            got = model(ids, attention_mask=mask).logits
    finally:
        ctx.__exit__(None, None, None)
    assert {c[-1] for c in op_calls} == {(3, -1), (-1, -1)}  # one sliding layer, one full layer
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).logits
    tol = atol(torch.float32) * max(1.0, ref.abs().max().item())
    assert max_diff(got[1], ref[1]) <= tol and max_diff(got[0, keep], ref[0, keep]) <= tol


def test_attention_dropout_in_training_goes_to_the_op():
    model, _ = pair(tiny_llama(attention_dropout=0.3))
    with torch.no_grad():
        evaluated = model(IDX).logits
    model.train()
    torch.manual_seed(1)
    a = model(IDX).logits
    torch.manual_seed(1)
    b = model(IDX).logits
    assert torch.equal(a, b) and max_diff(a, evaluated) > 1e-3
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IDX).logits, evaluated)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_loaded_with_the_attention_registered_matches_hf(tmp_path, impl, op_calls):
    """A Llama-architecture checkpoint (3 layers, GQA 8:2, head_dim 16 != hidden / heads, random
    weights, written offline) loaded with attn_implementation="pytorch_mqa" gives HF's logits
    (DESIGN §5's fp32 atol, scaled by the logits) and HF's greedy tokens, padded batch included."""
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=3, num_hidden_layers=3, head_dim=16).save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="pytorch_mqa").eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
    assert ours.config._attn_implementation == "pytorch_mqa"
    ids, mask, keep = padded_batch("left")
    ctx = no_fallback()
    try:
        with torch.no_grad():
            got_plain, got_padded = ours(ids).logits, ours(ids, attention_mask=mask).logits
        prompt, pmask = ids[:, :6], mask[:, :6]
        kw = dict(attention_mask=pmask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        tokens = ours.generate(prompt, **kw)
    finally:
        ctx.__exit__(None, None, None)
    assert op_calls[0][1] == (2, 11, 8, 16) and op_calls[0][2] == (2, 11, 2, 16)
    with torch.no_grad():
        want_plain, want_padded = ref(ids).logits, ref(ids, attention_mask=mask).logits
    tol = atol(torch.float32) * max(1.0, want_plain.abs().max().item())
    assert max_diff(got_plain, want_plain) <= tol
    assert max_diff(got_padded[1], want_padded[1]) <= tol and max_diff(got_padded[0, keep], want_padded[0, keep]) <= tol
    assert tokens.tolist() == ref.generate(prompt, **kw).tolist()
