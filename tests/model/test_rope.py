"""RoPE GPTs (GPTConfig(pos_embedding="rope")): tables and rotation against a float64 reference
(uncached, and in the cached op's fused append), cached == uncached == compiled greedy tokens,
training, checkpoints; the learned-position default is unchanged."""

import json
import math

import pytest
import torch

from model_helpers import tiny_config, tiny_gpt
from pytorch_mqa import GPT, GPTConfig, KVCache, generate
from pytorch_mqa.model.rope import rope_tables

G = torch.Generator().manual_seed(7)
IDX = torch.randint(0, 97, (2, 21), generator=G)


def rope_gpt(n_kv_head=2, **kw):
    return tiny_gpt(n_kv_head, pos_embedding="rope", **kw)


# ---- float64 reference ---------------------------------------------------------------------------


def rotate64(x, pos, theta):
    """x (B, T, H, D) rotated at positions pos (B, T), GPT-NeoX halves, in float64."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[..., None] * inv  # (B, T, D/2)
    c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x = x.double()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def attn64(attn, x, theta):
    """CausalSelfAttention with rotary q/k at positions 0..T-1, all in float64: (out, rotated k, v)."""
    B, T, _ = x.shape
    qkv = x.double() @ attn.c_attn.weight.double().T + attn.c_attn.bias.double()
    q, k, v = qkv.split(attn.split, -1)
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    pos = torch.arange(T).expand(B, T)
    q = rotate64(q.view(B, T, H, D), pos, theta)
    k = rotate64(k.view(B, T, Hkv, D), pos, theta)
    v = v.view(B, T, Hkv, D)
    kk, vv = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", s.softmax(-1), vv).reshape(B, T, H * D)
    return y @ attn.c_proj.weight.double().T + attn.c_proj.bias.double(), k, v


# ---- config and tables ---------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match=r"pos_embedding: expected one of \('learned', 'rope'\), got 'alibi'"):
        tiny_config(pos_embedding="alibi")
    with pytest.raises(ValueError, match="rope_theta: expected a number > 1, got 0.5"):
        tiny_config(pos_embedding="rope", rope_theta=0.5)
    with pytest.raises(ValueError, match="head_dim .* must be even, got 3"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_kv_head=1, n_embd=12, pos_embedding="rope")
    assert tiny_config().pos_embedding == "learned" and tiny_config().rope_theta == 10000.0


def test_tables_equal_float64_formula():
    cos, sin = rope_tables(300, 16, 500.0)
    assert cos.shape == sin.shape == (300, 8) and cos.dtype == torch.float32
    ang = torch.arange(300, dtype=torch.float64)[:, None] * 500.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.equal(cos, ang.cos().float()) and torch.equal(sin, ang.sin().float())
    with pytest.raises(ValueError, match="dim: expected an even int >= 2, got 7"):
        rope_tables(4, 7)


def test_rope_model_has_no_wpe_and_unsaved_tables():
    model = rope_gpt()
    assert "wpe" not in model.transformer
    sd = model.state_dict()
    assert not any("wpe" in k or "rope" in k for k in sd)
    assert model.rope_cos.shape == model.rope_sin.shape == (64, 4)  # block_size, head_dim / 2
    learned = tiny_gpt()
    assert "transformer.wpe.weight" in learned.state_dict() and not hasattr(learned, "rope_cos")
    # Without wpe the count of all parameters and of non-embedding ones differ by wte only (tied head).
    assert model.num_params(non_embedding=True) == model.num_params(non_embedding=False)


def test_learned_default_unchanged():
    """The default config builds the same parameters (names, order, values) as an explicit 'learned'."""
    torch.manual_seed(0)
    a = GPT(tiny_config())
    torch.manual_seed(0)
    b = GPT(tiny_config(pos_embedding="learned", rope_theta=123.0))
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a(IDX), b(IDX))


# ---- rotation against float64 --------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_uncached_rotation_equals_float64(n_kv_head):
    model = rope_gpt(n_kv_head, rope_theta=300.0)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 21, 32, generator=G)
    pos = torch.arange(21).expand(2, 21)
    with torch.no_grad():
        got = attn(x, rope=(model.rope_cos, model.rope_sin, pos))
    want, _, _ = attn64(attn, x, 300.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_cached_rotation_equals_float64(paged):
    """Cached prefill in two chunks through the op's fused rotary append: the outputs and the
    rotated K written to the cache equal the float64 reference."""
    model = rope_gpt(2, rope_theta=300.0)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 21, 32, generator=G)
    kw = dict(page_size=16, num_pages=4) if paged else {}
    cache = KVCache.for_model(model, 2, 40, **kw)
    rope = (model.rope_cos, model.rope_sin, None)
    outs = []
    with torch.no_grad():
        for a, b in ((0, 9), (9, 10), (10, 21)):
            cache.allocate(b - a)
            outs.append(attn(x[:, a:b], cache.k[0], cache.v[0], cache.cache_seqlens, rope=rope, block_table=cache.block_table))
            cache.advance(b - a)
    want, k64, v64 = attn64(attn, x, 300.0)
    torch.testing.assert_close(torch.cat(outs, 1).double(), want, rtol=0, atol=2e-5)
    for b in range(2):
        if paged:
            rows = cache.k[0][torch.tensor(cache.pages(b))].flatten(0, 1)[:21]
        else:
            rows = cache.k[0][b, :21]
        torch.testing.assert_close(rows.double(), k64[b], rtol=0, atol=2e-6)


def test_cached_forward_equals_full_forward():
    model = rope_gpt(2)
    full = model(IDX)
    cache = KVCache.for_model(model, 2, max_seqlen=24)
    parts = [model(IDX[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 21))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    # Positions matter: the same tokens one position later give other logits.
    shifted = model(torch.cat([IDX[:, :1], IDX], 1))[:, 1:]
    assert (shifted - full).abs().max() > 1e-3


# ---- generation ----------------------------------------------------------------------------------


def test_cached_greedy_equals_uncached():
    model = rope_gpt(1)
    prompts = [IDX[0, :5].tolist(), IDX[1].tolist(), IDX[0, :12].tolist()]
    cached = generate(model, prompts, 16, temperature=0)
    assert cached == generate(model, prompts, 16, temperature=0, use_cache=False)
    assert len({tuple(t) for t in cached}) == 3 and all(len(set(t)) > 2 for t in cached)


def test_compiled_greedy_equals_eager():
    model = rope_gpt(2)
    prompts = [IDX[0, :6].tolist(), IDX[1, :9].tolist()]
    eager = generate(model, prompts, 10, temperature=0)
    assert generate(model, prompts, 10, temperature=0, compile=True) == eager


# ---- training and checkpoints --------------------------------------------------------------------


def test_rope_gpt_trains(one_thread):
    torch.manual_seed(0)
    model = GPT(tiny_config(2, pos_embedding="rope"))
    data = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_load_round_trip_and_old_configs(tmp_path):
    pytest.importorskip("safetensors")
    model = rope_gpt(2, rope_theta=2500.0)
    model.save_pretrained(tmp_path / "rope")
    cfg = json.loads((tmp_path / "rope" / "config.json").read_text())
    assert cfg["pos_embedding"] == "rope" and cfg["rope_theta"] == 2500.0
    back = GPT.from_pretrained(tmp_path / "rope")
    assert back.config == model.config and torch.equal(back.rope_cos, model.rope_cos)
    torch.testing.assert_close(back(IDX), model(IDX), rtol=0, atol=0)
    with pytest.raises(ValueError, match="format: 'hf' is a GPT-2 layout with learned positions"):
        model.save_pretrained(tmp_path / "hf", format="hf")
    from pytorch_mqa.model import export

    with pytest.raises(ValueError, match="format: 'scratch' is a GPT-2 layout with learned positions"):
        export.save_scratch(model, str(tmp_path / "scratch"))
    assert not (tmp_path / "hf").exists() and not (tmp_path / "scratch").exists()
    # A config.json written before the rope fields existed loads with learned positions.
    learned = tiny_gpt(2)
    learned.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    old = json.loads(path.read_text())
    del old["pos_embedding"], old["rope_theta"]
    path.write_text(json.dumps(old))
    back = GPT.from_pretrained(tmp_path / "old")
    assert back.config.pos_embedding == "learned"
    torch.testing.assert_close(back(IDX), learned(IDX), rtol=0, atol=0)


def test_packed_rope_forward_equals_each_document_alone():
    """Packed documents with rotary positions: each document's logits are those of running it alone
    (positions restart at 0 in every document, for the rotation too)."""
    torch.manual_seed(0)
    model = rope_gpt().eval()
    docs = [torch.randint(0, 97, (n,), generator=G) for n in (5, 1, 13)]
    idx = torch.cat(docs)
    cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32)
    with torch.no_grad():
        packed = model(idx, cu_seqlens=cu, max_seqlen=13)
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
