"""Loading and saving GPT weights: Hugging Face GPT-2, the from-scratch GPT-2 layout, our own.

Every checkpoint is first mapped, name by name, onto this package's MHA/GQA layout (the names of
`GPT.state_dict()`), with every shape asserted; keys that are neither mapped nor known buffers
are reported, as are missing ones. `n_kv_head` then converts K/V projections by mean-pooling the
KV heads of each group (Ainslie et al., 2023, "GQA", section 2.1).

Formats (detected from the keys):
- Hugging Face GPT-2 (`GPT2LMHeadModel` / `GPT2Model`): `[transformer.]h.N.attn.c_attn` etc.
  Conv1D weights are stored (in, out) and are transposed here.
- The from-scratch layout (`tok_emb`, `pos_emb`, `trf_blocks.N.att.W_query|W_key|W_value|
  out_proj`, `trf_blocks.N.ff.layers.0|2`, `trf_blocks.N.norm1|norm2.scale|shift`,
  `final_norm`, `out_head`).

An output head equal to the embedding (or absent) is tied, as in GPT-2; a different one is kept
untied (`GPTConfig(tie_embeddings=False)`, e.g. the from-scratch tutorial's own `out_head`).
Writing the Hugging Face and from-scratch layouts back is model/export.py's.
- `GPT.save_pretrained`: config.json with `"format": "pytorch_mqa.GPT"` + model.safetensors. The
  config holds every GPTConfig field (pos_embedding and rope_theta included); a config.json
  written before a field existed loads with that field's default (learned positions).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from typing import Optional

import torch

from pytorch_mqa.core.dtypes import as_dtype
from pytorch_mqa.model.config import GPTConfig

OUR_FORMAT = "pytorch_mqa.GPT"

# Buffers some checkpoints carry that are not weights (causal masks).
_IGNORED = (re.compile(r"(.*\.)?attn\.(bias|masked_bias)$"), re.compile(r".*\.att\.mask$"))


# --------------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------------


def _load_file(path: str) -> tuple[dict, dict]:
    """A weights file -> (state dict, safetensors metadata or {})."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"path: expected {path} to hold a state dict, got {type(sd).__name__}")
    for key in ("model_state_dict", "state_dict", "model"):  # training checkpoints
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    return sd, {}


def _read(path) -> tuple[dict, dict, dict]:
    """path (directory or file) -> (state dict, config.json contents or {}, file metadata)."""
    path = os.fspath(path)
    config = {}
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                sd, meta = _load_file(os.path.join(path, name))
                return sd, config, meta
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.exists(os.path.join(path, index)):
                with open(os.path.join(path, index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                sd = {}
                for shard in shards:
                    sd.update(_load_file(os.path.join(path, shard))[0])
                return sd, config, {}
        raise FileNotFoundError(
            f"path: expected {path} to contain model.safetensors or pytorch_model.bin (or a sharded index), "
            f"found {sorted(os.listdir(path))}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file or directory: {path}")
    cfg_path = os.path.join(os.path.dirname(path), "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    sd, meta = _load_file(path)
    return sd, config, meta


def _strip_wrappers(sd: dict) -> dict:
    """Drop the prefixes torch.compile (`_orig_mod.`) and DDP (`module.`) put on every key."""
    for prefix in ("_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------
# Mapping onto our names.
# --------------------------------------------------------------------------------------------


class _Mapper:
    """Takes source tensors by name, checks their shapes, records what was used."""

    def __init__(self, sd: dict, fmt: str):
        self.sd, self.fmt, self.used = sd, fmt, set()
        self.missing: list[str] = []

    def has(self, name: str) -> bool:
        return name in self.sd

    def take(self, name: str, shape: tuple) -> Optional[torch.Tensor]:
        if name not in self.sd:
            self.missing.append(name)
            return None
        t = self.sd[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.fmt} checkpoint: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(name)
        return t

    def finish(self, out: dict) -> dict:
        unknown = sorted(k for k in self.sd if k not in self.used and not any(p.match(k) for p in _IGNORED))
        if self.missing or unknown:
            raise ValueError(
                f"{self.fmt} checkpoint does not match a GPT-2 layout: missing keys {self.missing[:10]}"
                f"{' ...' if len(self.missing) > 10 else ''}; unknown keys {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}"
            )
        return out


def _n_layer(sd: dict, pattern: str) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    if not idx:
        raise ValueError(f"checkpoint: found no transformer blocks (no key matches {pattern!r})")
    return max(idx) + 1


def _head(m: _Mapper, name: str, wte: torch.Tensor, out: dict, cfg: dict, tied: Optional[bool] = None) -> None:
    """The output head: tied to the embedding when absent or equal to it (GPT-2), else kept as an
    untied `lm_head.weight` with `tie_embeddings=False` (the from-scratch tutorial's `out_head`).
    `tied` (from config.json) overrides what the tensors say."""
    head = m.take(name, tuple(wte.shape)) if m.has(name) else None
    if tied is None:
        tied = head is None or torch.equal(head, wte)
    if not tied:
        if head is None:
            raise ValueError(f"{m.fmt} checkpoint: its config says the output head is untied, but {name} is missing")
        out["lm_head.weight"] = head
    cfg["tie_embeddings"] = bool(tied)


def _from_hf(sd: dict, n_head: int, tied: Optional[bool] = None) -> tuple[dict, dict]:
    """Hugging Face GPT-2 -> (our state dict, config fields). Conv1D weights are (in, out)."""
    p = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    m = _Mapper(sd, "Hugging Face GPT-2")
    V, C = sd[p + "wte.weight"].shape
    block = sd[p + "wpe.weight"].shape[0]
    n_layer = _n_layer(sd, re.escape(p) + r"h\.(\d+)\.")
    bias = (p + "h.0.attn.c_attn.bias") in sd
    out = {"transformer.wte.weight": m.take(p + "wte.weight", (V, C)), "transformer.wpe.weight": m.take(p + "wpe.weight", (block, C))}

    def conv1d(src, dst, n_in, n_out):
        out[dst + ".weight"] = m.take(src + ".weight", (n_in, n_out)).t().contiguous()
        if bias:
            out[dst + ".bias"] = m.take(src + ".bias", (n_out,))

    def norm(src, dst):
        out[dst + ".weight"] = m.take(src + ".weight", (C,))
        if bias:
            out[dst + ".bias"] = m.take(src + ".bias", (C,))

    for i in range(n_layer):
        s, d = f"{p}h.{i}.", f"transformer.h.{i}."
        norm(s + "ln_1", d + "ln_1")
        conv1d(s + "attn.c_attn", d + "attn.c_attn", C, 3 * C)
        conv1d(s + "attn.c_proj", d + "attn.c_proj", C, C)
        norm(s + "ln_2", d + "ln_2")
        conv1d(s + "mlp.c_fc", d + "mlp.c_fc", C, 4 * C)
        conv1d(s + "mlp.c_proj", d + "mlp.c_proj", 4 * C, C)
    norm(p + "ln_f", "transformer.ln_f")
    cfg = dict(vocab_size=V, block_size=block, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, n_embd=C, bias=bias)
    _head(m, "lm_head.weight", out["transformer.wte.weight"], out, cfg, tied)
    return m.finish(out), cfg


def _from_scratch(sd: dict, n_head: int) -> tuple[dict, dict]:
    """The from-scratch GPT-2 layout -> (our state dict, config fields). Linear weights are (out, in)."""
    m = _Mapper(sd, "from-scratch GPT-2")
    V, C = sd["tok_emb.weight"].shape
    block = sd["pos_emb.weight"].shape[0]
    n_layer = _n_layer(sd, r"trf_blocks\.(\d+)\.")
    out = {"transformer.wte.weight": m.take("tok_emb.weight", (V, C)), "transformer.wpe.weight": m.take("pos_emb.weight", (block, C))}

    def linear(src, dst, n_in, n_out):
        out[dst + ".weight"] = m.take(src + ".weight", (n_out, n_in))
        out[dst + ".bias"] = m.take(src + ".bias", (n_out,))

    def norm(src, dst):
        out[dst + ".weight"] = m.take(src + ".scale", (C,))
        out[dst + ".bias"] = m.take(src + ".shift", (C,))

    for i in range(n_layer):
        s, d = f"trf_blocks.{i}.", f"transformer.h.{i}."
        norm(s + "norm1", d + "ln_1")
        w = [m.take(f"{s}att.{n}.weight", (C, C)) for n in ("W_query", "W_key", "W_value")]
        out[d + "attn.c_attn.weight"] = torch.cat(w)
        if m.has(s + "att.W_query.bias"):  # qkv_bias=True (as in the GPT-2 weights)
            out[d + "attn.c_attn.bias"] = torch.cat([m.take(f"{s}att.{n}.bias", (C,)) for n in ("W_query", "W_key", "W_value")])
        else:
            out[d + "attn.c_attn.bias"] = w[0].new_zeros(3 * C)
        linear(s + "att.out_proj", d + "attn.c_proj", C, C)
        norm(s + "norm2", d + "ln_2")
        linear(s + "ff.layers.0", d + "mlp.c_fc", C, 4 * C)
        linear(s + "ff.layers.2", d + "mlp.c_proj", 4 * C, C)
    norm("final_norm", "transformer.ln_f")
    cfg = dict(vocab_size=V, block_size=block, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, n_embd=C, bias=True)
    _head(m, "out_head.weight", out["transformer.wte.weight"], out, cfg)
    return m.finish(out), cfg


def _from_ours(cls, sd: dict, config: dict) -> tuple[dict, dict]:
    fields = {k: config[k] for k in GPTConfig.__dataclass_fields__ if k in config}
    cfg = GPTConfig(**fields)
    with torch.device("meta"):
        expected = cls(cfg).state_dict()
    expected.pop("lm_head.weight", None)
    m = _Mapper(sd, "pytorch_mqa")
    out = {k: m.take(k, tuple(v.shape)) for k, v in expected.items()}
    _head(m, "lm_head.weight", out["transformer.wte.weight"], out, fields, cfg.tie_embeddings if "tie_embeddings"
          in fields else None)
    return m.finish(out), fields


def _infer_ours_config(sd: dict, n_head: Optional[int], path) -> dict:
    """GPTConfig fields of a bare state dict in this package's layout (no config.json), from its shapes.

    The shapes give everything but the number of query heads: with `n_head`, the KV heads follow
    from the fused projection's rows, (n_head + 2 n_kv_head) * head_dim.
    """
    if n_head is None:
        raise ValueError(f"n_head: the pytorch_mqa weights file {path} has no config.json beside it and its shapes "
                         "do not say how many query heads it has; pass n_head= (the CLI's --n-head)")
    V, C = sd["transformer.wte.weight"].shape
    if "transformer.wpe.weight" not in sd:
        raise ValueError(f"path: the pytorch_mqa weights file {path} has no position table (a pos_embedding='rope' "
                         "model) and no config.json beside it, so its block_size and rope_theta are unknown; keep "
                         "the config.json that save_pretrained writes next to it")
    if C % n_head:
        raise ValueError(f"n_head: expected a divisor of the weights' n_embd = {C}, got {n_head}")
    D = C // n_head
    rows = sd["transformer.h.0.attn.c_attn.weight"].shape[0] if "transformer.h.0.attn.c_attn.weight" in sd else 3 * C
    n_kv = (rows // D - n_head) // 2
    if rows % D or n_kv < 1 or (n_head + 2 * n_kv) * D != rows or n_head % n_kv:
        raise ValueError(f"n_head: {n_head} query heads of dim {D} do not fit the fused projection's {rows} rows "
                         "((n_head + 2 n_kv_head) * head_dim)")
    return dict(vocab_size=int(V), block_size=int(sd["transformer.wpe.weight"].shape[0]),
                n_layer=_n_layer(sd, r"transformer\.h\.(\d+)\."), n_head=n_head, n_kv_head=n_kv, n_embd=int(C),
                bias="transformer.h.0.attn.c_attn.bias" in sd)


def _hf_n_head(config: dict, n_head: Optional[int], C: int, fmt: str) -> int:
    cfg_heads = config.get("n_head", config.get("n_heads", config.get("num_attention_heads")))
    if n_head is not None and cfg_heads is not None and n_head != cfg_heads:
        raise ValueError(f"n_head: the checkpoint's config.json says {cfg_heads}, got n_head={n_head}")
    heads = n_head if n_head is not None else cfg_heads
    if heads is None:
        raise ValueError(
            f"n_head: a {fmt} weights file without config.json does not say how many heads it has; "
            f"pass n_head= (GPT-2 checkpoints use n_embd // 64 = {C // 64})"
        )
    return int(heads)


def _check_hf_config(config: dict) -> None:
    """Refuse GPT-2 variants this architecture does not compute."""
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"config.json: activation_function {act!r} is not supported (this GPT uses GELU tanh)")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        raise ValueError(f"config.json: layer_norm_epsilon {eps} is not supported (this GPT uses 1e-5)")
    if config.get("scale_attn_by_inverse_layer_idx", False) or not config.get("scale_attn_weights", True):
        raise ValueError("config.json: only the standard 1/sqrt(head_dim) attention scale is supported")


# --------------------------------------------------------------------------------------------
# MHA -> GQA/MQA.
# --------------------------------------------------------------------------------------------


def convert_kv_heads(sd: dict, cfg: dict, n_kv_head: int) -> dict:
    """Mean-pool the K/V projection heads of each group: Hkv -> n_kv_head (Hkv % n_kv_head == 0).

    KV head j of the result serves query heads [j*G, (j+1)*G) with G = n_head // n_kv_head; it
    is the mean of the old KV heads those query heads read.
    """
    H, Hkv, C = cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"]
    if n_kv_head == Hkv:
        return sd
    if not isinstance(n_kv_head, int) or n_kv_head < 1 or H % n_kv_head or Hkv % n_kv_head:
        raise ValueError(
            f"n_kv_head: expected a divisor of the checkpoint's {Hkv} KV heads (and of n_head = {H}), got {n_kv_head!r}"
        )
    D, r = C // H, Hkv // n_kv_head
    sd = dict(sd)
    for i in range(cfg["n_layer"]):
        for suffix in ("weight", "bias"):
            name = f"transformer.h.{i}.attn.c_attn.{suffix}"
            if name not in sd:
                continue
            w = sd[name]
            q, k, v = w.split((H * D, Hkv * D, Hkv * D), dim=0)
            tail = w.shape[1:]
            pool = lambda t: t.reshape(n_kv_head, r, D, *tail).float().mean(1).to(t.dtype).reshape(n_kv_head * D, *tail)
            sd[name] = torch.cat([q, pool(k), pool(v)])
    return sd


# --------------------------------------------------------------------------------------------
# Entry points (GPT.from_pretrained / GPT.save_pretrained).
# --------------------------------------------------------------------------------------------


def detect_format(sd: dict, config: dict, meta: dict) -> str:
    """'ours', 'hf' or 'scratch' from config.json / file metadata / the keys and shapes."""
    if config.get("format") == OUR_FORMAT or meta.get("format") == OUR_FORMAT:
        return "ours"
    if "tok_emb.weight" in sd:
        return "scratch"
    wte = "transformer.wte.weight" if "transformer.wte.weight" in sd else "wte.weight"
    if wte not in sd:
        raise ValueError(
            f"checkpoint: not a GPT-2 layout this package knows (no wte.weight / tok_emb.weight); "
            f"first keys {sorted(sd)[:8]}"
        )
    C = sd[wte].shape[1]
    p = wte[: -len("wte.weight")]
    c_attn = sd.get(p + "h.0.attn.c_attn.weight")
    # HF Conv1D stores (C, 3C); our Linear stores ((Hq + 2 Hkv) D, C), whose first dim is never C.
    if c_attn is not None and c_attn.shape[0] == C:
        return "hf"
    return "ours"


def load_pretrained(cls, path, *, n_kv_head=None, n_head=None, dtype=None, device=None):
    """Build `cls` (GPT) from a checkpoint; see GPT.from_pretrained for the formats."""
    sd, config, meta = _read(path)
    sd = _strip_wrappers(dict(sd))
    fmt = detect_format(sd, config, meta)
    if fmt == "hf":
        _check_hf_config(config)
        C = sd["transformer.wte.weight" if "transformer.wte.weight" in sd else "wte.weight"].shape[1]
        tied = config.get("tie_word_embeddings") if config else None
        ours, fields = _from_hf(sd, _hf_n_head(config, n_head, C, "Hugging Face GPT-2"), tied)
    elif fmt == "scratch":
        C = sd["tok_emb.weight"].shape[1]
        ours, fields = _from_scratch(sd, _hf_n_head(config, n_head, C, "from-scratch GPT-2"))
    else:
        if not config:
            config = _infer_ours_config(sd, n_head, path)
        ours, fields = _from_ours(cls, sd, config)
    fields.setdefault("n_kv_head", fields["n_head"])
    if n_kv_head is not None and n_kv_head != fields["n_kv_head"]:
        ours = convert_kv_heads(ours, fields, n_kv_head)
        fields["n_kv_head"] = n_kv_head
    dtype = as_dtype(dtype) or ours["transformer.wte.weight"].dtype
    with torch.device("meta"):
        model = cls(GPTConfig(**fields))
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    if fields.get("tie_embeddings", True):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint: missing {missing}, unexpected {unexpected}")
    if fields.get("tie_embeddings", True):
        model.lm_head.weight = model.transformer.wte.weight
        model.use_decode_layout()  # the loaded embedding is the tied head's weight now
    if model.config.pos_embedding == "rope":  # its rotary tables are not stored: compute them (built on meta)
        model.init_rope()
    return model.to(device=device or "cpu", dtype=dtype).eval()


def save_pretrained(model, directory) -> None:
    """Write config.json and model.safetensors (a tied lm_head is not stored; an untied one is)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = {"format": OUR_FORMAT, **asdict(model.config)}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tied = model.config.tie_embeddings
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": OUR_FORMAT})


__all__ = ["load_pretrained", "save_pretrained", "convert_kv_heads", "detect_format"]
