"""Generation: sampling helpers on hand-worked logits, greedy cache == no cache, ragged batches,
seeds, EOS, streaming, limits."""

import dataclasses
import math
import warnings

import pytest
import torch

from model_helpers import tiny_gpt
from pytorch_mqa import KVCache, generate
from pytorch_mqa.model.generation import ContextCropWarning, GenerationConfig, stream_generate
from pytorch_mqa.model.sampling import apply_repetition_penalty, logits_to_probs, sample, top_k_filter, top_p_filter

INF = float("inf")

# ---- sampling helpers ------------------------------------------------------------------------


def test_top_k_filter():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 2.0, 2.0, -1.0]])
    got = top_k_filter(x, 2)
    assert got.tolist() == [[-INF, 3.0, 2.0, -INF], [-INF, 2.0, 2.0, -INF]]
    assert top_k_filter(x, 1)[1].tolist() == [-INF, 2.0, 2.0, -INF]  # ties with the k-th stay
    assert torch.equal(top_k_filter(x, 10), x)  # k larger than V keeps everything


def test_top_p_filter():
    # probabilities 0.5, 0.2, 0.3: sorted 0.5, 0.3, 0.2; mass strictly before them 0, 0.5, 0.8
    x = torch.tensor([0.5, 0.2, 0.3]).log()
    assert torch.isfinite(top_p_filter(x, 0.4)).tolist() == [True, False, False]
    assert torch.isfinite(top_p_filter(x, 0.75)).tolist() == [True, False, True]
    assert torch.isfinite(top_p_filter(x, 0.85)).tolist() == [True, True, True]
    kept = top_p_filter(x, 0.75)
    assert kept[0] == x[0] and kept[2] == x[2]  # kept logits are unchanged


def test_repetition_penalty_divides_positive_multiplies_negative():
    x = torch.tensor([2.0, -1.0, 0.5, -3.0])
    seen = torch.tensor([True, True, False, False])
    assert apply_repetition_penalty(x, seen, 2.0).tolist() == [1.0, -2.0, 0.5, -3.0]
    assert torch.equal(apply_repetition_penalty(x, seen, 1.0), x)


def test_logits_to_probs_temperature_and_filters():
    x = torch.tensor([0.0, math.log(4.0)])
    torch.testing.assert_close(logits_to_probs(x, temperature=2.0), torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(logits_to_probs(x, temperature=1.0), torch.tensor([0.2, 0.8]))
    y = torch.tensor([1.0, 3.0, 2.0, 0.0])
    p = logits_to_probs(y, top_k=2)
    e = torch.tensor([math.e**3, math.e**2])
    torch.testing.assert_close(p, torch.tensor([0.0, e[0] / e.sum(), e[1] / e.sum(), 0.0]))
    assert logits_to_probs(y, top_p=0.01).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_sample_follows_probs():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert sample(probs, g).tolist() == [1, 2]
    draws = sample(torch.tensor([[0.25, 0.75]]).expand(4000, 2), g)
    assert abs(draws.float().mean().item() - 0.75) < 0.03


# ---- generation --------------------------------------------------------------------------------

PROMPTS = [[5, 17, 3, 9, 60, 2, 44], [12, 8], [70, 1, 33, 33]]


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_greedy_cache_equals_no_cache(n_kv_head):
    model = tiny_gpt(n_kv_head)
    cached = generate(model, PROMPTS, 12, temperature=0)
    uncached = generate(model, PROMPTS, 12, temperature=0, use_cache=False)
    assert cached == uncached
    assert [len(x) for x in cached] == [12, 12, 12]
    assert len({tuple(x) for x in cached}) == 3  # the sequences do differ


def test_ragged_batch_equals_each_alone():
    model = tiny_gpt(1)
    batch = generate(model, PROMPTS, 10, temperature=0)
    for prompt, got in zip(PROMPTS, batch):
        assert got == generate(model, [prompt], 10, temperature=0)[0]


def test_tensor_prompts_and_greedy_matches_argmax_loop():
    model = tiny_gpt(2)
    idx = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    got = generate(model, idx, 6, temperature=0)
    seq = idx.clone()
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert got == seq[:, 5:].tolist()


def test_seeded_sampling_reproducible():
    model = tiny_gpt(2)
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2)
    a = generate(model, PROMPTS, 16, seed=123, **kw)
    b = generate(model, PROMPTS, 16, seed=123, **kw)
    c = generate(model, PROMPTS, 16, seed=124, **kw)
    assert a == b and a != c
    assert a == generate(model, PROMPTS, 16, seed=123, use_cache=False, **kw)


def test_top_k_one_is_greedy():
    model = tiny_gpt(2)
    assert generate(model, PROMPTS, 8, top_k=1, seed=0) == generate(model, PROMPTS, 8, temperature=0)


def test_repetition_penalty_changes_greedy_choice():
    model = tiny_gpt(1)
    plain = generate(model, [[57]], 20, temperature=0)[0]
    penal = generate(model, [[57]], 20, temperature=0, repetition_penalty=100.0)[0]
    assert plain != penal
    assert len(set(plain)) < 20 and len(set(penal)) == 20  # a huge penalty forbids any repeat


def test_eos_stops_each_sequence_and_streams():
    model = tiny_gpt(2)
    full = generate(model, PROMPTS, 12, temperature=0)
    eos = full[1][3]  # sequence 1 emits it at step 3 (maybe earlier)
    stops = [x.index(eos) + 1 if eos in x else 12 for x in full]
    got = generate(model, PROMPTS, 12, temperature=0, eos_id=eos)
    assert got == [x[:n] for x, n in zip(full, stops)]
    events = []
    got2 = generate(model, PROMPTS, 12, temperature=0, eos_id=eos, on_token=lambda s, ids: events.append((s, ids)))
    assert got2 == got
    assert [s for s, _ in events] == list(range(len(events)))
    assert len(events) == max(stops)
    for s, ids in events:
        for b, t in enumerate(ids):
            assert t == (full[b][s] if s < stops[b] else None)
    assert list(stream_generate(model, PROMPTS, 12, temperature=0, eos_id=eos)) == events


def test_limits_and_bad_arguments():
    model = tiny_gpt(2, block_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no crop, no warning
        assert generate(model, [[1] * 10], 7, temperature=0)  # 10 + 7 - 1 == block_size: every position used
        assert len(generate(model, [[1] * 16], 1, temperature=0)[0]) == 1  # a full context predicts its next token
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, 97]], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="repetition_rule"):
        generate(model, [[1]], 3, repetition_penalty=1.2, repetition_rule="sometimes")
    assert generate(model, [[1], [2, 3]], 0) == [[], []]


def _crop_reference(model, prompt, n):
    """nanoGPT's loop: greedy, the model sees the last block_size tokens, nothing cached."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq[-model.config.block_size:]]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_generation_past_the_context_crops_like_nanogpt(n_kv_head):
    model = tiny_gpt(n_kv_head, block_size=16)
    prompts = [[1] * 10, [2, 3, 4], list(range(1, 31))]  # the last is longer than the context
    with pytest.warns(ContextCropWarning, match="cropped to the last 16 tokens") as record:
        cached = generate(model, prompts, 40, temperature=0)
    assert len(record) == 1  # said once
    with pytest.warns(ContextCropWarning):
        uncached = generate(model, prompts, 40, temperature=0, use_cache=False)
    assert cached == uncached and [len(x) for x in cached] == [40, 40, 40]  # never cut short
    assert cached == [_crop_reference(model, p, 40) for p in prompts]
    with pytest.warns(ContextCropWarning):
        same = generate(model, [[5, 6]] * 2, 30, temperature=0)  # one batch, every row re-filled at once
    assert same[0] == same[1] == _crop_reference(model, [5, 6], 30)


def test_any_model_mapping_ids_to_logits_generates():
    from pytorch_mqa.model.bigram import BigramConfig, BigramLM
    from pytorch_mqa.model.generation import supports_cache

    torch.manual_seed(0)
    bigram = BigramLM(BigramConfig(vocab_size=11, block_size=4))
    torch.nn.init.normal_(bigram.table.weight)
    assert not supports_cache(bigram) and supports_cache(tiny_gpt(1))
    with pytest.warns(ContextCropWarning):
        out = generate(bigram, [[1, 2]], 12, temperature=0)[0]
    want, t = [], 2
    for _ in range(12):
        t = int(bigram.table.weight[t].argmax())
        want.append(t)
    assert out == want

    class Plain(torch.nn.Module):  # no config at all: no context limit, no cache
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 7)

        def forward(self, idx):
            return self.emb(idx).cumsum(1)

    assert len(generate(Plain(), [[1, 2, 3]], 5, temperature=1.0, seed=0)[0]) == 5


def test_repetition_rules():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0, "ctrl").tolist() == [[1.0, -4.0, 1.0]]
    assert apply_repetition_penalty(logits, seen, 2.0, "divide").tolist() == [[1.0, -1.0, 1.0]]


def test_generate_restores_training_mode():
    model = tiny_gpt(2).train()
    generate(model, [[1, 2]], 3, temperature=0)
    assert model.training


def test_generation_config_validates_once_and_keywords_override():
    cfg = GenerationConfig(12, temperature=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 1.0
    model = tiny_gpt(2)
    want = generate(model, PROMPTS, 12, temperature=0)
    assert generate(model, PROMPTS, config=cfg) == want
    assert generate(model, PROMPTS, 5, config=cfg) == [t[:5] for t in want]  # max_new_tokens overrides
    assert generate(model, PROMPTS, config=GenerationConfig(12), temperature=0) == want  # so do keywords
    assert [ids for _, ids in stream_generate(model, PROMPTS, config=cfg)] == [list(t) for t in zip(*want)]
    for bad, match in (
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p"),
        (dict(max_new_tokens=2, repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=2, eos_id=-3), "eos_id"),
        (dict(max_new_tokens=2, seed=1.5), "seed"),
        (dict(max_new_tokens=2, use_cache="yes"), "use_cache"),
        (dict(max_new_tokens=2, compile=True, use_cache=False), "use_cache"),
    ):
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**bad)
    with pytest.raises(TypeError, match="top_q"):
        generate(model, PROMPTS, 2, top_q=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPTS)
    with pytest.raises(TypeError, match="config"):
        generate(model, PROMPTS, config=dict(max_new_tokens=2))


def test_one_block_body_and_the_op_runs_under_its_name():
    """Prefill, cached prefill and decode all run Block.forward; cached attention is the registered op."""
    from pytorch_mqa.model import gpt

    assert not hasattr(gpt.GPT, "forward_cached") and not hasattr(gpt.GPT, "decode_step")
    assert "decode_one_row_functional" not in vars(gpt)
    model = tiny_gpt(2)
    calls = []
    hook = model.transformer.h[0].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
    cache = KVCache.for_model(model, 1, 16)
    with torch.profiler.profile() as prof:
        model(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
    hook.remove()
    assert calls == [3, 3, 1]
    names = [e.name for e in prof.events()]
    assert names.count("pytorch_mqa::attention_with_kv_cache") == 2 * model.config.n_layer
    assert names.count("pytorch_mqa::attention") == model.config.n_layer


def _prefill(model, cache):
    for b, p in enumerate(PROMPTS):
        model(torch.tensor([p]), cache=cache.rows(b, b + 1))


@pytest.mark.slow
def test_compiled_step_writes_the_cache_in_place_and_matches_eager():
    """The compiled step (what compile=True runs) calls the op in the graph, once per layer, on the
    cache's own buffers (no copy of a buffer), and equals the eager cached forward, ragged lengths."""
    from torch._inductor.utils import run_and_get_code

    from pytorch_mqa.model.decode import DecodeStep

    torch.compiler.reset()
    model = tiny_gpt(2)
    cache, ref = KVCache.for_model(model, 3, 16), KVCache.for_model(model, 3, 16)
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        _prefill(model, cache)
        _prefill(model, ref)
        step = DecodeStep(model, cache)
        for tokens in (torch.tensor([4, 50, 7]), torch.tensor([9, 9, 1])):
            want = model(tokens[:, None], cache=ref)[:, -1]
            got, (code,) = run_and_get_code(step, tokens)
            torch.testing.assert_close(got, want)
    assert cache.lengths == ref.lengths == [9, 4, 6] and cache.cache_seqlens.tolist() == [9, 4, 6]
    for a, b in zip(cache.k + cache.v, ref.k + ref.v):
        torch.testing.assert_close(a, b)
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs
    assert code.count("torch.ops.pytorch_mqa.attention_with_kv_cache.default(") == model.config.n_layer
    assert ".copy_(" not in code  # the op's declared writes stay in place: no buffer is copied back


@pytest.mark.slow
def test_compiled_step_on_a_paged_cache_matches_eager_contiguous():
    """The compiled step on a paged KVCache takes its pages before each step (crossing a page
    boundary on the way) and passes the block table to the op: logits equal the eager
    contiguous cache's."""
    from pytorch_mqa.model.decode import DecodeStep

    torch.compiler.reset()
    model = tiny_gpt(2)
    paged = KVCache.for_model(model, 3, 32, page_size=16, num_pages=8)
    ref = KVCache.for_model(model, 3, 32)
    with torch.no_grad():
        _prefill(model, paged)
        _prefill(model, ref)
        step = DecodeStep(model, paged)
        for t in range(10):  # sequence 0 holds 7 rows: step 10 writes row 16, on its second page
            tokens = torch.tensor([4 + t, 50, 7 * t % 97])
            want = model(tokens[:, None], cache=ref)[:, -1]
            torch.testing.assert_close(step(tokens), want)
    assert paged.lengths == ref.lengths
    assert paged.num_free_pages == 8 - 4  # one page per sequence, and sequence 0's second


@pytest.mark.slow
def test_compiled_greedy_equals_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    model = tiny_gpt(2)
    eager = generate(model, PROMPTS, 40, temperature=0)
    assert generate(model, PROMPTS, 40, temperature=0, use_cache=False) == eager
    assert generate(model, PROMPTS, 40, temperature=0, compile=True) == eager
    assert counters["stats"]["unique_graphs"] == 1  # 39 decode steps, one graph: no recompiles
    with torch.profiler.profile() as prof:
        assert generate(model, PROMPTS, 40, temperature=0, compile=True) == eager
    assert counters["stats"]["unique_graphs"] == 1  # a second call of the same cache shape reuses it
    # The op runs under its own name in the compiled graph: n_layer calls per decode step, plus
    # the eager prefill (3 ragged prompts, one by one).
    names = [e.name for e in prof.events()]
    assert names.count("pytorch_mqa::attention_with_kv_cache") == model.config.n_layer * (39 + 3)
    other = tiny_gpt(2, seed=1)  # same shapes, other weights (constants of the frozen graph): its own graph
    assert generate(other, PROMPTS, 40, temperature=0, compile=True) == generate(other, PROMPTS, 40, temperature=0)
    assert counters["stats"]["unique_graphs"] == 2
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, PROMPTS, 4, compile=True, use_cache=False)


@pytest.mark.slow
def test_one_row_linear_is_f_linear_outside_a_graph():
    """decode.linear is F.linear in eager mode (bit for bit) and, traced, the multiply-and-sum
    form for one float32 CPU row only; both agree with F.linear to float32 rounding."""
    import torch.nn.functional as F

    from pytorch_mqa.model.decode import linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for x in (torch.randn(1, 1, 32, generator=g), torch.randn(3, 1, 32, generator=g)):
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        traced = torch.compile(linear, fullgraph=True, dynamic=False)(x, w, b)
        torch.testing.assert_close(traced, F.linear(x, w, b))
        assert traced.shape == x.shape[:-1] + (48,)
    x = torch.randn(1, 32, generator=g)  # no bias, 2-D
    torch.testing.assert_close(torch.compile(linear, fullgraph=True, dynamic=False)(x, w), F.linear(x, w))


@pytest.mark.slow
def test_compiled_batch_one_step_fuses_its_products():
    """At batch 1 the compiled step's products are inductor's own fused kernels (no BLAS call),
    small enough to run on one thread (no OpenMP region), and its logits equal the eager step's."""
    from torch._inductor.utils import run_and_get_code

    from pytorch_mqa.model.decode import DecodeStep

    torch.compiler.reset()
    model = tiny_gpt(2)
    cache, ref = KVCache.for_model(model, 1, 16), KVCache.for_model(model, 1, 16)
    with torch.no_grad():
        for c in (cache, ref):
            model(torch.tensor([PROMPTS[0]]), cache=c)
        step = DecodeStep(model, cache)
        tokens = torch.tensor([4])
        want = model(tokens[:, None], cache=ref)[:, -1]
        got, (code,) = run_and_get_code(step, tokens)
    torch.testing.assert_close(got, want)
    assert code.count("torch.ops.pytorch_mqa.attention_with_kv_cache.default(") == model.config.n_layer
    assert "extern_kernels" not in code.split("def call(")[-1] and "_mkl_linear" not in code
    assert "omp parallel" not in code
    assert generate(model, [PROMPTS[0]], 20, temperature=0, compile=True) == generate(model, [PROMPTS[0]], 20, temperature=0)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_graph_decode_equals_eager():
    """On CUDA the compiled step is replayed from a captured CUDA graph; tokens equal eager."""
    model = tiny_gpt(2).cuda()
    eager = generate(model, PROMPTS, 24, temperature=0)
    assert generate(model, PROMPTS, 24, temperature=0, compile=True) == eager
    assert generate(model, PROMPTS, 24, temperature=0, compile=True) == eager
