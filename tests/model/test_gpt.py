"""GPT: logits equal Hugging Face GPT-2 on the same weights (every checkpoint format), loss,
gradients, MHA -> GQA/MQA conversion, save/load round trip, clear loading errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from model_helpers import tiny_gpt, tiny_hf_gpt2, to_scratch_layout
from pytorch_mqa import GPT, GPTConfig, generate

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

IDX = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(HF model, directory written by save_pretrained)."""
    hf = tiny_hf_gpt2()
    d = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(d)
    return hf, d


def hf_logits(hf, idx=IDX):
    with torch.no_grad():
        return hf(idx).logits


def assert_logits_match(model, hf, idx=IDX):
    with torch.no_grad():
        got = model(idx)
    ref = hf_logits(hf, idx)
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, f"max |logits - HF| = {err:.2e}"


# ---- config and forward -------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_kv_head=3, n_embd=16)
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, n_kv_head=1, n_embd=16)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0, block_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_shapes_params_and_tied_head(n_kv_head):
    model = tiny_gpt(n_kv_head)
    assert model(IDX).shape == (2, 11, 97)
    assert model.lm_head.weight is model.transformer.wte.weight
    D = 32 // 4
    assert model.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * n_kv_head) * D, 32)


def test_no_bias_config():
    model = tiny_gpt(2, bias=False)
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    assert model(IDX).shape == (2, 11, 97)


def test_loss_and_gradients():
    model = tiny_gpt(2).train()
    targets = IDX.roll(-1, 1).clone()
    targets[:, -1] = -100
    targets[0, 3] = -100
    logits, loss = model(IDX, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_too_long_input():
    model = tiny_gpt(2, block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(9, dtype=torch.long))


# ---- Hugging Face GPT-2 -------------------------------------------------------------------------


def test_hf_directory_safetensors(hf_dir):
    hf, d = hf_dir
    model = GPT.from_pretrained(d)
    assert model.config.n_head == 4 and model.config.n_kv_head == 4 and model.config.block_size == 64
    # Conv1D weights (in, out) are (out, in) parameters laid out column-major: the same memory as Conv1D's
    assert all(p.is_contiguous() or p.t().is_contiguous() for p in model.parameters())
    assert_logits_match(model, hf)


def test_hf_bin_file_and_directory(hf_dir, tmp_path):
    hf, d = hf_dir
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # carries the tied lm_head too
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    assert_logits_match(GPT.from_pretrained(tmp_path), hf)
    assert_logits_match(GPT.from_pretrained(tmp_path / "pytorch_model.bin"), hf)
    # A bare weights file with no config.json beside it needs n_head.
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(hf.state_dict(), bare / "weights.bin")
    with pytest.raises(ValueError, match="n_head"):
        GPT.from_pretrained(bare / "weights.bin")
    assert_logits_match(GPT.from_pretrained(bare / "weights.bin", n_head=4), hf)


def test_hf_safetensors_file_without_prefix(hf_dir, tmp_path):
    """GPT2Model-style keys (no `transformer.` prefix), as in the original GPT-2 checkpoints."""
    from safetensors.torch import save_file

    hf, _ = hf_dir
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, tmp_path / "model.safetensors")
    assert_logits_match(GPT.from_pretrained(tmp_path / "model.safetensors", n_head=4), hf)


@pytest.mark.slow
def test_hf_greedy_generation_matches(hf_dir):
    """Cached, uncached and compiled greedy tokens equal Hugging Face generate on the same weights."""
    hf, d = hf_dir
    model = GPT.from_pretrained(d)
    prompt = IDX[:1, :6]
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    ref = ref[0, 6:].tolist()
    assert generate(model, prompt, 16, temperature=0) == [ref]
    assert generate(model, prompt, 16, temperature=0, use_cache=False) == [ref]
    assert generate(model, prompt, 16, temperature=0, compile=True) == [ref]
    assert len(set(ref)) > 3


def test_scratch_layout(hf_dir, tmp_path):
    hf, d = hf_dir
    sd = to_scratch_layout(GPT.from_pretrained(d))
    torch.save({"model_state_dict": sd, "epoch": 3}, tmp_path / "model.pth")
    assert_logits_match(GPT.from_pretrained(tmp_path / "model.pth", n_head=4), hf)
    cfg = {"vocab_size": 97, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "qkv_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_logits_match(GPT.from_pretrained(tmp_path / "model.pth"), hf)
    with pytest.raises(ValueError, match="config.json says 4"):
        GPT.from_pretrained(tmp_path / "model.pth", n_head=2)


def test_scratch_layout_untied_head_is_kept(hf_dir, tmp_path):
    tied = GPT.from_pretrained(hf_dir[1])
    sd = to_scratch_layout(tied)
    sd["out_head.weight"] = sd["out_head.weight"] + 1.0
    torch.save(sd, tmp_path / "m.pth")
    model = GPT.from_pretrained(tmp_path / "m.pth", n_head=4)
    assert model.config.tie_embeddings is False
    torch.testing.assert_close(model.lm_head.weight, tied.transformer.wte.weight + 1.0)
    torch.testing.assert_close(model.transformer.wte.weight, tied.transformer.wte.weight)


def test_loading_errors_name_the_keys(hf_dir, tmp_path):
    hf, _ = hf_dir
    sd = dict(hf.state_dict())
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(3)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "a.bin")
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.1.mlp.c_fc.bias'\].*unknown keys \['transformer.h.0.attn.extra.weight'\]"):
        GPT.from_pretrained(tmp_path / "a.bin", n_head=4)
    sd = dict(hf.state_dict())
    sd["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 100)
    torch.save(sd, tmp_path / "b.bin")
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp.c_fc.weight has shape \(32, 100\), expected \(32, 128\)"):
        GPT.from_pretrained(tmp_path / "b.bin", n_head=4)
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained(tmp_path / "nope")


def test_hf_config_variants_refused(tmp_path):
    hf = tiny_hf_gpt2(activation_function="relu")
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_pretrained(tmp_path)


# ---- MHA -> GQA / MQA, dtype, round trip --------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_kv_head_conversion(hf_dir, n_kv_head):
    _, d = hf_dir
    mha = GPT.from_pretrained(d)
    gqa = GPT.from_pretrained(d, n_kv_head=n_kv_head)
    assert gqa.config.n_kv_head == n_kv_head
    D, G = 8, 4 // n_kv_head
    w_old, w_new = mha.transformer.h[1].attn.c_attn.weight, gqa.transformer.h[1].attn.c_attn.weight
    b_old, b_new = mha.transformer.h[1].attn.c_attn.bias, gqa.transformer.h[1].attn.c_attn.bias
    assert w_new.shape == ((4 + 2 * n_kv_head) * D, 32)
    assert torch.equal(w_new[:32], w_old[:32])  # queries unchanged
    for part in (1, 2):  # K, then V
        old = w_old[32 * part : 32 * (part + 1)].reshape(4, D, 32)
        new = w_new[32 + (part - 1) * n_kv_head * D :][: n_kv_head * D].reshape(n_kv_head, D, 32)
        for j in range(n_kv_head):
            torch.testing.assert_close(new[j], old[j * G : (j + 1) * G].mean(0))
        oldb = b_old[32 * part : 32 * (part + 1)].reshape(4, D)
        newb = b_new[32 + (part - 1) * n_kv_head * D :][: n_kv_head * D].reshape(n_kv_head, D)
        torch.testing.assert_close(newb[0], oldb[:G].mean(0))
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    assert generate(gqa, prompts, 10, temperature=0) == generate(gqa, prompts, 10, temperature=0, use_cache=False)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT.from_pretrained(d, n_kv_head=3)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_save_pretrained_round_trip_exact(tmp_path, n_kv_head):
    model = tiny_gpt(n_kv_head, bias=n_kv_head == 1)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["n_kv_head"] == n_kv_head and cfg["format"] == "pytorch_mqa.GPT"
    again = GPT.from_pretrained(tmp_path)
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(again(IDX), model(IDX))
    assert again.lm_head.weight is again.transformer.wte.weight
    # Converting a saved GQA model further (4 -> 2 KV heads) works too.
    if n_kv_head == 4:
        assert GPT.from_pretrained(tmp_path, n_kv_head=2).config.n_kv_head == 2


def test_dtype_and_bf16_round_trip(tmp_path):
    model = tiny_gpt(2).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    again = GPT.from_pretrained(tmp_path)
    assert again.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(again(IDX), model(IDX))
    as32 = GPT.from_pretrained(tmp_path, dtype="float32")
    assert as32.transformer.wte.weight.dtype == torch.float32


# ---- attention dropout (GPTConfig.attn_dropout) ---------------------------------------------------


def test_attn_dropout_validation():
    with pytest.raises(ValueError, match=r"attn_dropout: expected a float in \[0, 1\), got 1.0"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=16, attn_dropout=1.0)


def test_attn_dropout_is_off_in_eval_and_with_a_cache():
    base, dropped = tiny_gpt(2), tiny_gpt(2, attn_dropout=0.5)
    with torch.no_grad():
        assert torch.equal(base(IDX), dropped(IDX))  # eval(): the field changes nothing
        torch.manual_seed(0)
        out = generate(dropped, IDX[:, :4], 5, temperature=0)
    assert out == generate(base, IDX[:, :4], 5, temperature=0)


def test_attn_dropout_in_training_is_seeded_and_differs_from_none():
    model = tiny_gpt(2, attn_dropout=0.3).train()
    plain = tiny_gpt(2).train()
    torch.manual_seed(7)
    a = model(IDX)
    torch.manual_seed(7)
    b = model(IDX)
    torch.manual_seed(8)
    c = model(IDX)
    assert torch.equal(a, b)  # same seed, same masks
    assert not torch.equal(a, c)
    with torch.no_grad():
        ref = plain(IDX)
    assert (a - ref).abs().max().item() > 1e-3  # the masks change the output
    # the same seed gives the same masks in the backward too: equal gradients
    grads = []
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(7)
        model(IDX).square().mean().backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_attn_dropout_round_trips_and_old_configs_load(tmp_path):
    model = tiny_gpt(2, attn_dropout=0.25)
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["attn_dropout"] == 0.25
    assert GPT.from_pretrained(tmp_path / "new").config.attn_dropout == 0.25
    # a checkpoint written before the field existed loads with attention dropout off
    tiny_gpt(2).save_pretrained(tmp_path / "old")
    cfg_file = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["attn_dropout"]
    cfg_file.write_text(json.dumps(cfg))
    loaded = GPT.from_pretrained(tmp_path / "old")
    assert loaded.config.attn_dropout == 0.0
    with torch.no_grad():
        assert torch.equal(loaded(IDX), tiny_gpt(2)(IDX))


def test_attn_dropout_tiny_run_trains():
    from pytorch_mqa.training.loop import LMBatches, TrainConfig, fit

    ids = torch.randint(0, 97, (3000,), generator=torch.Generator().manual_seed(0)) % 13  # 13 tokens used
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, attn_dropout=0.2))
    cfg = TrainConfig(max_steps=30, batch_size=8, lr=1e-2, warmup_steps=3, eval_interval=30, eval_iters=2,
                      progress=False, checkpoint_minutes=0)
    history = fit(model, LMBatches(ids, 8, 16), cfg)
    assert history["loss"][-1] < history["loss"][0] - 1.0


# ---- packed documents (cu_seqlens, attention_varlen) -----------------------------------------------

from pytorch_mqa.testing.tolerance import atol  # noqa: E402
from pytorch_mqa.training.data import pack_documents  # noqa: E402

DOCS = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 1, 0, 19, 12)]


def doc_targets(doc):
    t = torch.tensor(doc[1:] + [-100], dtype=torch.long)
    return t


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("flat", [True, False])
def test_packed_forward_equals_each_document_alone(n_kv_head, flat):
    """fp32 logits and loss of the packed row against each document run alone (DESIGN §5: in
    fp32 the rule is atol(float32) on values of magnitude ~1, so it is scaled by the logits' size)."""
    model = tiny_gpt(n_kv_head)
    ids, cu, max_len = pack_documents(DOCS)
    targets = torch.cat([doc_targets(d) for d in DOCS if d])
    if not flat:
        ids, targets = ids[None], targets[None]
    with torch.no_grad():
        logits, loss = model(ids, targets, cu_seqlens=cu, max_seqlen=max_len)
        assert logits.shape == (*ids.shape, 97)
        logits = logits.reshape(-1, 97)
        alone, nll_sum, n = [], 0.0, 0
        for d in DOCS:
            if d:
                lg, ls = model(torch.tensor([d]), doc_targets(d)[None])
                alone.append(lg[0])
                nll_sum, n = nll_sum + ls.item() * (len(d) - 1), n + len(d) - 1
        ref = torch.cat(alone)
    tol = atol(torch.float32) * max(1.0, ref.abs().max().item())
    assert (logits - ref).abs().max().item() <= tol
    assert abs(loss.item() - nll_sum / n) <= tol
    # max_seqlen read from cu_seqlens when omitted
    with torch.no_grad():
        again = model(ids, cu_seqlens=cu)
    assert torch.equal(again.reshape(-1, 97), logits)


def test_packed_positions_restart_and_no_token_crosses_a_boundary():
    """Changing the first document leaves the second's logits exactly alone."""
    model = tiny_gpt(2)
    a, b = DOCS[3], DOCS[4]
    ids, cu, m = pack_documents([a, b])
    ids2, _, _ = pack_documents([[(t + 1) % 97 for t in a], b])
    with torch.no_grad():
        one, two = model(ids, cu_seqlens=cu, max_seqlen=m), model(ids2, cu_seqlens=cu, max_seqlen=m)
    assert torch.equal(one[len(a):], two[len(a):])
    assert not torch.equal(one[: len(a)], two[: len(a)])


def test_packed_gradients_match_each_document_alone():
    model = tiny_gpt(2).train()
    docs = [d for d in DOCS if d]
    ids, cu, m = pack_documents(docs)
    targets = torch.cat([doc_targets(d) for d in docs])
    n_total = int((targets != -100).sum())
    _, loss = model(ids, targets, cu_seqlens=cu, max_seqlen=m)
    loss.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    for d in docs:
        _, ls = model(torch.tensor([d]), doc_targets(d)[None])
        (ls * (len(d) - 1) / n_total).backward()  # the token mean over all documents
    for k, p in model.named_parameters():
        tol = atol(torch.float32) * max(1.0, p.grad.abs().max().item())
        assert (packed[k] - p.grad).abs().max().item() <= tol, k


def test_packed_forward_compiles_fullgraph():
    model = tiny_gpt(2)
    ids, cu, m = pack_documents([d for d in DOCS if d])

    def step(idx, cu_seqlens):
        return model.logits(idx[None], cu_seqlens=cu_seqlens, max_seqlen=m, backend="reference")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, cu)
        ref = model(ids, cu_seqlens=cu, max_seqlen=m)
    assert torch.equal(got[0], ref)
    # the training step too: one graph forward and backward, the eager gradients
    model.train()
    w = model.transformer.h[0].attn.c_attn.weight
    compiled(ids, cu).square().mean().backward()
    compiled_grad, w.grad = w.grad.clone(), None
    step(ids, cu).square().mean().backward()
    assert torch.equal(compiled_grad, w.grad)


def test_packed_forward_errors():
    model = tiny_gpt(2)
    ids, cu, m = pack_documents(DOCS)
    with pytest.raises(ValueError, match=r"idx: expected shape \(total,\) or \(1, total\)"):
        model(ids.view(1, -1).expand(2, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens: expected an int32 tensor"):
        model(ids, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="max_seqlen: expected at most block_size = 64"):
        model(ids, cu_seqlens=cu, max_seqlen=65)
    with pytest.raises(ValueError, match="targets: expected shape"):
        model(ids, ids[:-1], cu_seqlens=cu)


def test_packed_attention_dropout_in_training_only():
    ids, cu, m = pack_documents([d for d in DOCS if d])
    model = tiny_gpt(2, attn_dropout=0.3)
    with torch.no_grad():
        evaluated = model(ids, cu_seqlens=cu, max_seqlen=m)
        assert torch.equal(evaluated, tiny_gpt(2)(ids, cu_seqlens=cu, max_seqlen=m))
    model.train()
    torch.manual_seed(3)
    a = model(ids, cu_seqlens=cu, max_seqlen=m)
    torch.manual_seed(3)
    b = model(ids, cu_seqlens=cu, max_seqlen=m)
    assert torch.equal(a, b) and (a - evaluated).abs().max().item() > 1e-3
