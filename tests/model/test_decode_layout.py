"""The products' weight layout (model/decode.py's `column_major_`): every Linear weight, the tied
token embedding included, is an (out, in) parameter stored column-major, whatever built or loaded
the model; values, results and tokens are those of the row-major layout, and a weight changed in
place is what the next step reads (the layout lives in the parameter itself, no copy)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_helpers import tiny_gpt, tiny_hf_gpt2
from pytorch_mqa import GPT, generate
from pytorch_mqa.model.decode import column_major_


def _column_major(t) -> bool:
    return t.dim() == 2 and t.stride() == (1, t.shape[0])


def _product_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def _row_major_copy(model):
    """The same model with every matrix row-major (the layout before column_major_)."""
    other = tiny_gpt(model.config.n_kv_head)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.data = p.data.contiguous()
    assert all(p.is_contiguous() for p in other.parameters())
    return other


def test_every_product_weight_is_column_major_after_build_load_and_cast(tmp_path):
    model = tiny_gpt()
    weights = _product_weights(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives the re-layout
    assert all(_column_major(w) for w in weights)
    assert model.transformer.wpe.weight.is_contiguous()  # a lookup table only: left row-major
    assert all(_column_major(w) for w in _product_weights(model.to(torch.bfloat16)))
    # load_state_dict with assign=True puts the given (row-major) tensors in place: the hook re-lays them
    fresh = tiny_gpt(seed=1)
    sd = {k: v.contiguous() for k, v in tiny_gpt(seed=2).state_dict().items()}
    fresh.load_state_dict(sd, assign=True)
    fresh.lm_head.weight = fresh.transformer.wte.weight
    fresh.use_decode_layout()
    assert all(_column_major(w) for w in _product_weights(fresh))
    # our format and the Hugging Face directory load column-major too
    model.float().save_pretrained(tmp_path / "ours")
    assert all(_column_major(w) for w in _product_weights(GPT.from_pretrained(tmp_path / "ours")))
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    loaded = GPT.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert all(_column_major(w) for w in _product_weights(loaded))
    assert column_major_(_product_weights(loaded)) == 0  # already laid out: nothing copied again


def test_one_row_products_and_greedy_tokens_equal_the_row_major_layout():
    model = tiny_gpt()
    other = _row_major_copy(model)
    torch.manual_seed(0)
    for m_col, m_row in zip(_product_weights(model), _product_weights(other)):
        x = torch.randn(1, 1, m_col.shape[1])
        # fp32 products of the same values summed in another order: within a few ulps of the row sum
        want = F.linear(x.double(), m_row.double())
        tol = 4 * torch.finfo(torch.float32).eps * (x.double().abs() @ m_row.double().abs().t()).max()
        assert (F.linear(x, m_col).double() - want).abs().max() <= tol
        assert (F.linear(x, m_row).double() - want).abs().max() <= tol
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert generate(model, prompts, 12, temperature=0) == generate(other, prompts, 12, temperature=0)
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-5)


def test_a_weight_changed_in_place_is_seen_by_the_next_step(tmp_path):
    model = tiny_gpt()
    prompt = [[3, 1, 4, 1, 5]]
    before = generate(model, prompt, 10, temperature=0)
    target = tiny_gpt(seed=7)
    want = generate(target, prompt, 10, temperature=0)
    assert want != before
    model.load_state_dict(target.state_dict())  # copy_ into the column-major parameters
    assert all(_column_major(w) for w in _product_weights(model))
    assert generate(model, prompt, 10, temperature=0) == want
    # an optimizer step (in place) too: the tokens follow the updated weights
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    ref = _row_major_copy(model)
    assert generate(model, prompt, 10, temperature=0) == generate(ref, prompt, 10, temperature=0) != want


def test_training_on_column_major_weights_matches_row_major():
    model = tiny_gpt().train()
    other = _row_major_copy(model).train()
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    for m in (model, other):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            m(x, y)[1].backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        if _column_major(a):
            assert a.grad.stride() == a.stride()  # gradients follow the layout: no copy per step
    assert all(_column_major(w) for w in _product_weights(model))


def test_compiled_step_keeps_one_graph_per_model_and_per_weight_tensor():
    """The compiled step's guards skip module structure but keep parameter identity: two models of
    one shape each get their own frozen graph, and so does a weight assigned as a new tensor."""
    prompt = [[3, 1, 4, 1, 5]]
    a, b = tiny_gpt(seed=0), tiny_gpt(seed=5)
    ea, eb = generate(a, prompt, 10, temperature=0), generate(b, prompt, 10, temperature=0)
    assert ea != eb
    assert generate(a, prompt, 10, temperature=0, compile=True) == ea
    assert generate(b, prompt, 10, temperature=0, compile=True) == eb
    assert generate(a, prompt, 10, temperature=0, compile=True) == ea
    c = tiny_gpt(seed=9)
    a.lm_head.weight = a.transformer.wte.weight = nn.Parameter(c.transformer.wte.weight.detach().clone())
    a.use_decode_layout()
    want = generate(a, prompt, 10, temperature=0)
    assert want != ea and generate(a, prompt, 10, temperature=0, compile=True) == want
