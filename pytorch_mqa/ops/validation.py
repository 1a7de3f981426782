"""Input validation of both ops (DESIGN §4): every message names the argument, the expected and
the received value. The public functions run them once per call, before the op; the op itself
does not validate again. Capacity (`check_cache_capacity`) needs the lengths on the host, so it
runs where the op reads them, once, before anything is written."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_tensor(name: str, x, shape_doc: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor {shape_doc}, got shape {tuple(x.shape)}")


def _check_same(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {x.device}")


def _check_q_and_kv(q: Tensor, k: Tensor, k_name: str, check_batch: bool = True) -> None:
    """Shared checks of q (B, Tq, Hq, D) against a K-like tensor (B, T, Hkv, D) (its batch dim
    not checked with check_batch=False: paged or indexed caches, see `validate_serving`)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: expected dtype in (float16, bfloat16, float32), got {q.dtype}")
    D = q.shape[3]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim D in 1..{MAX_HEAD_DIM}, got D={D}")
    if check_batch and k.shape[0] != q.shape[0]:
        raise ValueError(f"{k_name}: expected batch size {q.shape[0]} (q.shape[0]), got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{k_name}: expected head dim {D} (q.shape[3]), got {k.shape[3]}")
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hkv < 1:
        raise ValueError(f"{k_name}: expected at least one KV head, got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"q: expected the number of query heads to be a multiple of the KV heads "
            f"({k_name}.shape[2]={Hkv}), got Hq={Hq}"
        )


def _check_flags(causal, scale) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite float, got {scale}")


def _flags_and_shapes_ok(q, k, v, causal, scale) -> bool:
    """The checks `attention_ok` and `kv_cache_ok` share: causal a bool, scale None or finite, q
    (B, Tq, Hq, D) and K-like k, v (B, T, Hkv, D) of one supported dtype with Hq % Hkv == 0."""
    if (causal is not True and causal is not False) or not (
        scale is None or (type(scale) in (float, int) and math.isfinite(scale))
    ):
        return False
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4 or v.shape != ks:
        return False
    dt = q.dtype
    if dt not in SUPPORTED_DTYPES or k.dtype != dt or v.dtype != dt:
        return False
    D = qs[3]
    return ks[0] == qs[0] and ks[3] == D and 1 <= D <= MAX_HEAD_DIM and ks[2] >= 1 and qs[2] % ks[2] == 0


def attention_ok(q, k, v, causal, scale) -> bool:
    """True only if every check of `validate_attention` passes, in few attribute reads (the
    per-call fast path of `attention`). False sends the call through the detailed checks, which
    raise with the message."""
    try:
        if not _flags_and_shapes_ok(q, k, v, causal, scale):
            return False
        if q.is_cpu:
            return k.is_cpu and v.is_cpu
        dev = q.device
        return k.device == dev and v.device == dev
    except (AttributeError, TypeError, ValueError):
        return False


def validate_attention(q, k, v, causal=False, scale=None) -> None:
    _check_tensor("q", q, "(B, Tq, Hq, D)")
    _check_tensor("k", k, "(B, Tk, Hkv, D)")
    _check_tensor("v", v, "(B, Tk, Hkv, D)")
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    _check_q_and_kv(q, k, "k")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
    _check_flags(causal, scale)


def kv_cache_ok(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale) -> bool:
    """True only if every check of `validate_kv_cache` passes, in few attribute reads (a decode
    step calls this per layer; `is_cpu` where it can, which builds no device object). False sends
    the call through the detailed checks, which raise."""
    try:
        if not _flags_and_shapes_ok(q, k_cache, v_cache, causal, scale):
            return False
        qs, ks, dt = q.shape, k_cache.shape, q.dtype
        B, Tq, _, D = qs
        new = k is not None or v is not None
        if new:
            ns = k.shape
            if v.shape != ns or ns[0] != B or ns[1] != Tq or ns[2] != ks[2] or ns[3] != D or k.dtype != dt or v.dtype != dt:
                return False
        if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
            return False
        if q.is_cpu:
            return k_cache.is_cpu and v_cache.is_cpu and cache_seqlens.is_cpu and (not new or (k.is_cpu and v.is_cpu))
        dev = q.device
        if k_cache.device != dev or v_cache.device != dev or (new and (k.device != dev or v.device != dev)):
            return False
        return cache_seqlens.is_cpu or cache_seqlens.device == dev
    except (AttributeError, TypeError, ValueError):
        return False


def validate_kv_cache(q, k_cache, v_cache, k, v, cache_seqlens, causal=True, scale=None, indexed: bool = False) -> None:
    """The checks of the cache op's tensors; indexed=True (a block_table or cache_batch_idx is
    given) leaves the caches' first two dims to `validate_serving`."""
    if not indexed and kv_cache_ok(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale):
        return
    doc = "(num_blocks, page_size, Hkv, D) or (B_cache, S, Hkv, D)" if indexed else "(B, S, Hkv, D)"
    _check_tensor("q", q, "(B, Tq, Hq, D)")
    _check_tensor("k_cache", k_cache, doc)
    _check_tensor("v_cache", v_cache, doc)
    _check_same("k_cache", k_cache, "q", q)
    _check_same("v_cache", v_cache, "q", q)
    _check_q_and_kv(q, k_cache, "k_cache", check_batch=not indexed)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache: expected shape {tuple(k_cache.shape)} (the shape of k_cache), got {tuple(v_cache.shape)}"
        )
    if (k is None) != (v is None):
        given, missing = ("k", "v") if v is None else ("v", "k")
        raise ValueError(f"{missing}: expected a tensor because {given} is given (pass both or neither), got None")
    B = q.shape[0]
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    if k is not None:
        # New rows: Tn = k.shape[1], usually Tq; any count is allowed, as in FlashAttention.
        for name, x in (("k", k), ("v", v)):
            _check_tensor(name, x, "(B, Tn, Hkv, D)")
            _check_same(name, x, "q", q)
            if x.shape[0] != B or x.shape[2] != Hkv or x.shape[3] != D:
                raise ValueError(f"{name}: expected shape ({B}, Tn, {Hkv}, {D}) (B, Tn, Hkv, D), got {tuple(x.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens: expected an int32 tensor of shape ({B},) or an int, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: expected dtype torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens: expected shape ({B},) (one length per sequence), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device.type != "cpu" and cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected device {q.device} or cpu, got {cache_seqlens.device}")
    _check_flags(causal, scale)


def check_cache_capacity(lens: list, S: int, new: int, what: str = "cache capacity") -> tuple[int, int]:
    """DESIGN §4's capacity check on lengths read on the host: 0 <= L_b and L_b + new <= S
    (S: the rows of a contiguous cache, or max_blocks * page_size through a block_table).
    Returns (min, max) of the lengths ((0, 0) for an empty batch).

    Called where the lengths are read (the CPU kernel, or the dispatch of a GPU backend given
    host lengths), once per call and before anything is written.
    """
    if not lens:
        return 0, 0
    lo, hi = min(lens), max(lens)
    if lo < 0:
        raise ValueError(f"cache_seqlens: expected values >= 0, got {lo} for sequence {lens.index(lo)}")
    if hi + new > S:
        raise ValueError(
            f"cache_seqlens: expected cache_seqlens[b] + Tq <= S = {S} ({what}), got "
            f"cache_seqlens[{lens.index(hi)}] = {hi} with Tq = {new} new rows"
        )
    return lo, hi


# ---- the serving caches (block_table, cache_batch_idx, cache_leftpad, rotary) -----------------


def _index_tensor(name: str, x, shape: tuple | None, shape_doc: str, q: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected an int32 tensor {shape_doc}, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} {shape_doc}, got {tuple(x.shape)}")
    if x.device.type != "cpu" and x.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (the device of q) or cpu, got {x.device}")


def _host(*xs) -> bool:
    """True when every given tensor can be read without a device sync or a traced branch."""
    return not torch.compiler.is_compiling() and all(x is None or x.device.type == "cpu" for x in xs)


def _first(vals: list, bad) -> int:
    return next(i for i, x in enumerate(vals) if bad(x))


def _check_rotary(q, k, rotary_cos, rotary_sin, rotary_interleaved) -> int:
    """Checks of rotary_cos / rotary_sin (S_ro, rotary_dim / 2); returns S_ro (0 without rotary)."""
    if rotary_cos is None and rotary_sin is None:
        return 0
    if (rotary_cos is None) != (rotary_sin is None):
        given, missing = ("rotary_cos", "rotary_sin") if rotary_sin is None else ("rotary_sin", "rotary_cos")
        raise ValueError(f"{missing}: expected a tensor because {given} is given (pass both or neither), got None")
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved: expected a bool, got {type(rotary_interleaved).__name__}")
    D = q.shape[3]
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a tensor (S_ro, rotary_dim / 2), got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor (S_ro, rotary_dim / 2), got shape {tuple(x.shape)}")
        if x.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q) or torch.float32, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {x.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(
            f"rotary_sin: expected shape {tuple(rotary_cos.shape)} (the shape of rotary_cos), got {tuple(rotary_sin.shape)}"
        )
    if 2 * rotary_cos.shape[1] > D:
        raise ValueError(
            f"rotary_cos: expected rotary_dim = 2 * rotary_cos.shape[1] <= D = {D} (an even rotary_dim at most "
            f"the head dim), got rotary_dim = {2 * rotary_cos.shape[1]}"
        )
    if k is None:
        raise ValueError(
            "k: expected new k/v because rotary_cos/rotary_sin are given (rotary is applied in the append, "
            "as FlashAttention requires), got None"
        )
    return rotary_cos.shape[0]


def validate_serving(q, k_cache, k, cache_seqlens, causal, window_size, block_table=None, cache_batch_idx=None,
                     cache_leftpad=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=True) -> int:
    """The checks of the serving-cache arguments (DESIGN §3, §4); returns the capacity per
    sequence S (max_blocks * page_size when paged). Shapes, dtypes and devices always; values
    (page indices, slots, left padding, rotary positions, capacity) when they are on the host
    and the call is eager, never by a device sync."""
    B, Tq = q.shape[0], q.shape[1]
    n_caches = k_cache.shape[0]
    if block_table is not None:
        _index_tensor("block_table", block_table, None, "(B, max_blocks)", q)
        if block_table.dim() != 2:
            raise ValueError(f"block_table: expected a 2-D tensor (B, max_blocks), got shape {tuple(block_table.shape)}")
        rows = block_table.shape[0]
        if cache_batch_idx is None and rows != B:
            raise ValueError(f"block_table: expected {B} rows (B = q.shape[0]), got shape {tuple(block_table.shape)}")
        page = k_cache.shape[1]
        if page == 0 or page % 16:
            raise ValueError(
                f"k_cache: expected a paged cache (num_blocks, page_size, Hkv, D) with page_size a positive multiple "
                f"of 16, got page_size = {page} (shape {tuple(k_cache.shape)})"
            )
        if n_caches < 1:
            raise ValueError(f"k_cache: expected at least one page (num_blocks >= 1), got shape {tuple(k_cache.shape)}")
        S = block_table.shape[1] * page
        what = f"block_table.shape[1] * page_size = {block_table.shape[1]} * {page}"
    else:
        rows, S, page = n_caches, k_cache.shape[1], 0
        what = "cache capacity"
        if cache_batch_idx is None and n_caches != B:
            raise ValueError(f"k_cache: expected batch size {B} (q.shape[0]), got {n_caches}")
    if cache_batch_idx is not None:
        _index_tensor("cache_batch_idx", cache_batch_idx, (B,), "(one cache slot per sequence)", q)
        if B > 0 and rows < 1:
            where = "block_table rows" if block_table is not None else "cache slots (k_cache.shape[0])"
            raise ValueError(f"cache_batch_idx: expected at least one of the {where} to index, got 0")
    if cache_leftpad is not None:
        _index_tensor("cache_leftpad", cache_leftpad, (B,), "(first valid row per sequence)", q)
    S_ro = _check_rotary(q, k, rotary_cos, rotary_sin, rotary_interleaved)
    if not _host(cache_seqlens, block_table, cache_batch_idx, cache_leftpad):
        return S
    new = k.shape[1] if k is not None else 0
    lens = cache_seqlens.tolist()
    check_cache_capacity(lens, S, new, what)
    slots = list(range(B)) if cache_batch_idx is None else cache_batch_idx.tolist()
    if slots and (min(slots) < 0 or max(slots) >= rows):
        b = _first(slots, lambda x: not 0 <= x < rows)
        where = "block_table.shape[0]" if block_table is not None else "k_cache.shape[0]"
        raise ValueError(f"cache_batch_idx: expected values in [0, {rows}) ({where}), got {slots[b]} for sequence {b}")
    if new and cache_batch_idx is not None and len(set(slots)) < len(slots):
        dup = next(x for x in slots if slots.count(x) > 1)
        raise ValueError(
            f"cache_batch_idx: expected distinct slots when new k/v are appended (two sequences would write the "
            f"same cache rows), got slot {dup} for sequences {[b for b, x in enumerate(slots) if x == dup]}"
        )
    pads = [0] * B if cache_leftpad is None else cache_leftpad.tolist()
    for b, (p, L) in enumerate(zip(pads, lens)):
        if not 0 <= p <= L:
            raise ValueError(
                f"cache_leftpad: expected 0 <= cache_leftpad[b] <= cache_seqlens[b], got cache_leftpad[{b}] = {p} "
                f"with cache_seqlens[{b}] = {L}"
            )
    if block_table is not None and B > 0:
        # The pages holding rows [P_b, L_b + Tn) of each sequence; other entries may hold anything.
        table = block_table[torch.tensor(slots)]
        col = torch.arange(table.shape[1])[None, :]
        first_page = torch.tensor([p // page for p in pads])[:, None]
        end_page = torch.tensor([-(-(L + new) // page) for L in lens])[:, None]
        bad = (col >= first_page) & (col < end_page) & ((table < 0) | (table >= n_caches))
        if bool(bad.any()):
            b, c = bad.nonzero()[0].tolist()
            raise ValueError(
                f"block_table: expected page indices in [0, {n_caches}) (k_cache.shape[0]) for the pages sequence "
                f"{b} uses, got block_table[{slots[b]}, {c}] = {int(table[b, c])}"
            )
    if S_ro and lens:
        per_token = causal or tuple(window_size) != (-1, -1)
        need = max(L + max(new, Tq if per_token else 1) for L in lens)
        if need > S_ro:
            raise ValueError(
                f"rotary_cos: expected at least {need} rows (positions up to max(cache_seqlens) + "
                f"{max(new, Tq if per_token else 1)} - 1), got S_ro = {S_ro}"
            )
    return S


# ---- the variants (window_size, softcap, alibi_slopes, dropout_p) and varlen --------------------


NO_WINDOW = (-1, -1)


def no_variants(window_size, softcap, alibi_slopes, dropout_p) -> bool:
    """True only if every variant argument is at its default (the plain op): what
    `validate_variants` accepts and returns (-1, -1) for, in few checks. False sends the call
    through `validate_variants`, which raises for a bad value."""
    if alibi_slopes is not None or type(softcap) not in (float, int) or type(dropout_p) not in (float, int):
        return False
    if softcap != 0 or dropout_p != 0:
        return False
    if window_size is NO_WINDOW:
        return True
    return (type(window_size) in (tuple, list) and len(window_size) == 2
            and type(window_size[0]) is int and type(window_size[1]) is int and window_size[0] == window_size[1] == -1)


def validate_variants(q, window_size, softcap, alibi_slopes, dropout_p, *, batch: int, heads: int, cache_op: bool = False):
    """Checks of the variant arguments of DESIGN §3; returns (left, right) as ints.

    batch and heads are B and Hq (for varlen, the number of sequences and Hq)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right) of ints, got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window_size: expected ints (-1 = unbounded), got {side} = {w!r}")
        if w < -1:
            raise ValueError(f"window_size: expected {side} >= -1 (-1 = unbounded), got {w}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a float (0 = off), got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor):
            raise TypeError(f"alibi_slopes: expected a float32 tensor (Hq,) or (B, Hq), got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes: expected dtype torch.float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(
                f"alibi_slopes: expected shape ({heads},) or ({batch}, {heads}) (Hq,) or (B, Hq), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes: expected device {q.device} (the device of q), got {alibi_slopes.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    if cache_op and dropout_p != 0:
        raise ValueError(f"dropout_p: expected 0 (attention_with_kv_cache is for inference, no dropout), got {dropout_p}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    return int(window_size[0]), int(window_size[1])


def _check_cu_seqlens(name: str, cu, total: int, n_seq: int | None, max_name: str, max_seqlen) -> list | None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected an int32 tensor (B + 1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D tensor (B + 1,) with B >= 0, got shape {tuple(cu.shape)}")
    if n_seq is not None and cu.shape[0] != n_seq + 1:
        raise ValueError(f"{name}: expected shape ({n_seq + 1},) (that of cu_seqlens_q), got {tuple(cu.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name}: expected a host int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{max_name}: expected an int >= 0, got {max_seqlen}")
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return None  # on a device, reading the values would synchronise; a traced graph cannot read them
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals, vals[1:])]
    if any(n < 0 for n in lens):
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name}: expected non-decreasing values, got {vals[i]} then {vals[i + 1]} at index {i}")
    if vals[-1] != total:
        raise ValueError(f"{name}: expected the last value to be the total number of rows {total}, got {vals[-1]}")
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{max_name}: expected an int >= the longest sequence {max(lens)}, got {max_seqlen}")
    return lens


def validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale) -> int:
    """Checks of `attention_varlen`'s tensors; returns the number of sequences B. The values of
    cu_seqlens (0 first, non-decreasing, ending at the total, within max_seqlen) are checked
    when they are on the CPU and the call is eager; on a GPU that would be a device sync, and
    under torch.compile a data-dependent branch, so there they are not read."""
    for name, x, doc in (("q", q, "(total_q, Hq, D)"), ("k", k, "(total_k, Hkv, D)"), ("v", v, "(total_k, Hkv, D)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor {doc}, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor {doc}, got shape {tuple(x.shape)}")
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    _check_q_and_kv(q[None], k[None], "k")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
    _check_flags(causal, scale)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None, "max_seqlen_q", max_seqlen_q)
    B = cu_seqlens_q.shape[0] - 1
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], B, "max_seqlen_k", max_seqlen_k)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != q.device and cu.device.type != "cpu":
            raise ValueError(f"{name}: expected device {q.device} (the device of q) or cpu, got {cu.device}")
    return B


def validate_varlen_pages(k, v, cu_seqlens_k, max_seqlen_k, block_table) -> None:
    """Checks of a paged `attention_varlen` call (k, v (num_blocks, page_size, Hkv, D) page pools,
    block_table int32 (B, max_blocks)) before its pages are gathered: shapes, dtype, page size,
    capacity, and, when block_table and cu_seqlens_k are on the host, the pages each sequence uses."""
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor (num_blocks, page_size, Hkv, D), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name}: expected a 4-D page pool (num_blocks, page_size, Hkv, D) with block_table, got shape {tuple(x.shape)}"
            )
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
    page = k.shape[1]
    if page == 0 or page % 16:
        raise ValueError(f"k: expected page_size (k.shape[1]) a positive multiple of 16, got {page}")
    _index_tensor("block_table", block_table, None, "(B, max_blocks)", k)
    if not isinstance(cu_seqlens_k, Tensor) or cu_seqlens_k.dim() != 1:
        raise ValueError("cu_seqlens_k: expected an int32 tensor of shape (B + 1,)")
    B = cu_seqlens_k.shape[0] - 1
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(
            f"block_table: expected shape ({B}, max_blocks) (B = len(cu_seqlens_k) - 1), got {tuple(block_table.shape)}"
        )
    S = block_table.shape[1] * page
    if isinstance(max_seqlen_k, int) and max_seqlen_k > S:
        raise ValueError(
            f"max_seqlen_k: expected at most block_table.shape[1] * page_size = {S} (the pages a sequence can hold), "
            f"got {max_seqlen_k}"
        )
    if not _host(cu_seqlens_k, block_table) or B == 0:
        return
    lens = cu_seqlens_k.diff().tolist()
    for b, n in enumerate(lens):
        if not 0 <= n <= S:
            raise ValueError(f"cu_seqlens_k: expected sequence lengths in [0, {S}] (the block table's capacity), "
                             f"got {n} for sequence {b}")
        used = block_table[b, : -(-n // page)]
        bad = (used < 0) | (used >= k.shape[0])
        if bool(bad.any()):
            c = int(bad.nonzero()[0, 0])
            raise ValueError(f"block_table: expected page indices in [0, {k.shape[0]}) (k.shape[0]) for the pages "
                             f"sequence {b} uses, got block_table[{b}, {c}] = {int(used[c])}")


__all__ = ["attention_ok", "kv_cache_ok", "no_variants", "NO_WINDOW", "validate_varlen_pages", "validate_serving", "validate_variants", "validate_varlen", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "validate_attention", "validate_kv_cache", "check_cache_capacity"]
