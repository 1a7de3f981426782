"""register_backend: a user's kernel behind the package's custom ops, as backend=name."""

import json

import pytest
import torch
import torch.nn.functional as F

import pytorch_mqa
from pytorch_mqa import cli, reference
from pytorch_mqa.model import GPT, GPTConfig
from pytorch_mqa.ops.backends import OP_BACKENDS, use_backend
from pytorch_mqa.testing import attention_inputs, kv_cache_inputs, load_backend_plugins


class Counting:
    """A user kernel (SDPA with the package's bottom-right mask) that counts its calls."""

    def __init__(self, top_left=False):
        self.calls = 0
        self.top_left = top_left

    def __call__(self, q, k, v, *, causal, scale, return_lse=False):
        self.calls += 1
        Tq, Tk = q.shape[1], k.shape[1]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if causal:
            mask = torch.ones(Tq, Tk, dtype=torch.bool).tril() if self.top_left else reference.causal_mask(Tq, Tk)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        out = out.transpose(1, 2).nan_to_num(0.0).contiguous()
        G = q.shape[2] // k.shape[2]
        s = qh.float() @ kh.float().repeat_interleave(G, 1).transpose(-1, -2) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return out, torch.logsumexp(s, -1)


def decode(q, k_cache, v_cache, k, v, *, cache_seqlens, causal, scale, return_lse=False):
    decode.calls += 1
    return reference.attention_with_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal=causal, scale=scale)


decode.calls = 0


@pytest.fixture
def registered():
    names = []

    def register(name, **kw):
        pytorch_mqa.register_backend(name, **kw)
        names.append(name)

    yield register
    for name in names:
        if name in pytorch_mqa.available_backends("cpu"):
            pytorch_mqa.unregister_backend(name)


def test_backend_name_runs_the_user_kernel_behind_the_op(registered):
    fn = Counting()
    registered("mine", attention=fn)
    q, k, v = attention_inputs((2, 7, 9, 4, 2, 16), torch.float32, seed=1)
    out, lse = pytorch_mqa.attention(q, k, v, causal=True, return_lse=True, backend="mine")
    assert fn.calls == 1
    want, want_lse = reference.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)
    # The registered op is what runs: torch.ops.pytorch_mqa.attention with backend="mine".
    torch.ops.pytorch_mqa.attention(q, k, v, True, 0.25, "mine")
    assert fn.calls == 2
    assert "mine" in pytorch_mqa.available_backends("cpu") and "mine" in OP_BACKENDS["attention"]
    assert "mine" not in OP_BACKENDS["attention_with_kv_cache"]
    with pytest.raises(ValueError, match="backend: expected one of"):
        pytorch_mqa.attention_with_kv_cache(q, k, v, cache_seqlens=0, backend="mine")


def test_gradients_flow_through_the_reference_backward(registered):
    registered("mine", attention=Counting())
    q, k, v = attention_inputs((1, 5, 5, 4, 1, 8), torch.float32, seed=2)
    grads = []
    for backend in ("mine", "reference"):
        a, b, c = (x.clone().requires_grad_(True) for x in (q, k, v))
        pytorch_mqa.attention(a, b, c, causal=True, backend=backend).sum().backward()
        grads.append((a.grad, b.grad, c.grad))
    for g, want in zip(*grads):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-5)


def test_a_model_uses_it_through_use_backend_and_the_environment(registered, monkeypatch):
    fn = Counting()
    registered("mine", attention=fn)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_kv_head=1, n_embd=32)).eval()
    idx = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
        with use_backend("mine"):
            got = model(idx)
        assert fn.calls == 2  # one call per layer
        monkeypatch.setenv("PYTORCH_MQA_BACKEND", "mine")
        model(idx)
        assert fn.calls == 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_the_cache_op_and_the_op_checks(registered):
    decode.calls = 0
    registered("mine_decode", attention_with_kv_cache=decode)
    q, kc, vc, k, v, lens = kv_cache_inputs((2, 1, 16, 4, 2, 8, [3, 0]), torch.float32, seed=3)
    kc2, vc2 = kc.clone(), vc.clone()
    out = pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, backend="mine_decode")
    want = pytorch_mqa.attention_with_kv_cache(q, kc2, vc2, k, v, cache_seqlens=lens, backend="reference")
    # "reference" on CPU runs the CPU kernel, not the oracle the user backend wraps: equal to rounding.
    assert decode.calls == 1 and torch.allclose(out, want, atol=1e-6) and torch.equal(kc, kc2)
    with pytest.raises(ValueError, match="cache_seqlens"):  # validation still runs before the user kernel
        pytorch_mqa.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=16, backend="mine_decode")
    assert decode.calls == 1


def test_validate_accepts_a_correct_kernel_and_rejects_a_wrong_one_naming_cases(registered):
    registered("good", attention=Counting(), validate=True, dtypes=(torch.float32,))
    assert "good" in pytorch_mqa.available_backends("cpu")
    with pytest.raises(ValueError) as e:
        pytorch_mqa.register_backend("bad", attention=Counting(top_left=True), validate=True, dtypes=(torch.float32,))
    assert "B=1 Tq=33 Tk=65 Hq=8 Hkv=2 D=40 float32 causal" in str(e.value)
    assert "B=1 Tq=33 Tk=65 Hq=8 Hkv=2 D=40 float32 full" not in str(e.value)
    assert "bad" not in pytorch_mqa.available_backends("cpu") and "bad" not in OP_BACKENDS["attention"]


def test_a_kernel_returning_no_lse_is_refused_with_a_clear_error(registered):
    registered("no_lse", attention=lambda q, k, v, **kw: q.clone())
    q, k, v = attention_inputs((1, 3, 3, 2, 1, 8), torch.float32)
    with pytest.raises(RuntimeError, match="to return \\(out, lse\\)"):
        pytorch_mqa.attention(q, k, v, backend="no_lse")


def test_names_and_devices_are_checked(registered):
    with pytest.raises(ValueError, match="name: expected an identifier other than"):
        pytorch_mqa.register_backend("triton", attention=Counting())
    with pytest.raises(ValueError, match="at least one callable"):
        pytorch_mqa.register_backend("empty")
    with pytest.raises(ValueError, match="name: expected a registered user backend"):
        pytorch_mqa.unregister_backend("reference")
    registered("gpu_only", attention=Counting(), device_types=("cuda",))
    assert "gpu_only" not in pytorch_mqa.available_backends("cpu")
    q, k, v = attention_inputs((1, 3, 3, 2, 1, 8), torch.float32)
    with pytest.raises(RuntimeError, match="registered for \\('cuda',\\) only"):
        pytorch_mqa.attention(q, k, v, backend="gpu_only")


def test_opcheck_passes_on_a_user_backend(registered):
    registered("mine", attention=Counting())
    q, k, v = attention_inputs((1, 4, 6, 4, 2, 8), torch.float32, seed=5)
    torch.library.opcheck(torch.ops.pytorch_mqa.attention.default, (q, k, v, True, 0.3, "mine"),
                          test_utils=("test_schema", "test_faketensor"))


def test_info_lists_registered_and_plugin_backends(registered, tmp_path, monkeypatch, capsys):
    registered("mine", attention=Counting())
    # An installed plugin: a distribution declaring a pytorch_mqa.backends entry point.
    (tmp_path / "mqa_plugin_pkg.py").write_text(
        "import torch\nimport pytorch_mqa\nfrom pytorch_mqa import reference\n"
        "def attention(q, k, v, *, causal, scale, return_lse=False):\n"
        "    return reference.attention(q, k, v, causal=causal, scale=scale)\n"
        "def register():\n    pytorch_mqa.register_backend('from_plugin', attention=attention)\n")
    dist = tmp_path / "mqa_plugin_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mqa-plugin-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pytorch_mqa.backends]\nfrom_plugin = mqa_plugin_pkg:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cli.main(["info", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["backends"]["cpu"]["mine"] == "available"
        assert info["backends"]["cpu"]["from_plugin"] == "available"
        assert load_backend_plugins() == ["from_plugin"]
    finally:
        if "from_plugin" in pytorch_mqa.available_backends("cpu"):
            pytorch_mqa.unregister_backend("from_plugin")


def test_compiles_fullgraph_with_a_user_backend(registered):
    fn = Counting()
    registered("mine", attention=fn)
    f = torch.compile(lambda q, k, v: pytorch_mqa.attention(q, k, v, causal=True, backend="mine"),
                      fullgraph=True, backend="aot_eager")
    q, k, v = attention_inputs((1, 4, 6, 2, 1, 8), torch.float32, seed=6)
    q.requires_grad_(True)
    out = f(q, k, v)
    out.sum().backward()
    assert fn.calls == 1 and q.grad is not None
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=True)[0], rtol=0, atol=1e-5)
