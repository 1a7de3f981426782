"""For run.py: draws FlashAttention's parametrizations by feature and cost before pytest generates
them (`sample_module`, called at the end of the prepared test file), and as a pytest plugin puts a
time limit on each test and writes one JSON line per test (outcome, features, error ratios).

Configured by the JSON file named in FA_SELECT_CONFIG (written by run.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import zlib

import pytest

# Tests that call the public Python API (the others call FlashAttention's C++ entry points).
# Per test: batch * heads of its inputs, and how many times the backward runs.
TESTS = {
    "test_flash_attn_qkvpacked": (4 * 9, 2),
    "test_flash_attn_varlen_qkvpacked": (5 * 6, 2),
    "test_flash_attn_output": (4 * 6, 2),
    "test_flash_attn_varlen_output": (4 * 6, 2),
    "test_flash_attn_causal": (8 * 9, 2),
    "test_flash_attn_varlen_causal": (8 * 9, 2),
    "test_flash_attn_splitkv": (1 * 12, 2),
    "test_flash_attn_kvcache": (2 * 6, 0),
    "test_flash_attn_deterministic": (4 * 9, 51),
    "test_flash_attn_varlen_deterministic": (2 * 9, 51),
    "test_flash_attn_kvcache_paged_block_table_bounds": (1, 0),
}

FEATURES = ("window", "softcap", "alibi", "varlen", "dropout", "paged", "leftpad", "batch_idx", "rotary")


def features_of(name: str, params: dict) -> list:
    f = []
    if params.get("local"):
        f.append("window")
    if params.get("softcap", 0.0) > 0:
        f.append("softcap")
    if params.get("alibi"):
        f.append("alibi")
    if "varlen" in name:
        f.append("varlen")
    if params.get("dropout_p", 0.0) > 0:
        f.append("dropout")
    if params.get("paged_kv_block_size") is not None or name == "test_flash_attn_kvcache_paged_block_table_bounds":
        f.append("paged")
    if params.get("has_leftpad"):
        f.append("leftpad")
    if params.get("has_batch_idx"):
        f.append("batch_idx")
    d = params.get("d", 0)
    if params.get("rotary_fraction", 0.0) > 0 and math.floor(int(params["rotary_fraction"] * d) / 16) * 16 > 0:
        f.append("rotary")
    return f


def suite_skips(name: str, params: dict) -> bool:
    """True for the parametrizations the test itself skips at its start (not drawn)."""
    if params.get("softcap", 0.0) > 0 and params.get("dropout_p", 0.0) > 0:
        return True  # "Softcap and dropout not supported together"
    if name == "test_flash_attn_kvcache":
        new_kv = params["new_kv"]
        paged = params["paged_kv_block_size"] is not None
        return bool((params["seqlen_q"] > params["seqlen_k"] and new_kv) or (not new_kv and params["rotary_fraction"] > 0)
                    or (params["has_batch_idx"] and paged) or (params["has_leftpad"] and paged))
    return False


def work_of(name: str, params: dict) -> float:
    """A relative cost: batch * heads * Tq * Tk * D * (forward + backward passes), plus the
    identity-V calls that build S_dmask under dropout."""
    bh, backs = TESTS[name]
    if "seqlen" in params:
        tq = tk = params["seqlen"]
    else:
        tq, tk = params.get("seqlen_q", 1), params.get("seqlen_k", 1)
    d = params.get("d", 64)
    passes = 3 + 2 * backs
    if params.get("dropout_p", 0.0) > 0:
        passes += 2 * math.ceil(tk / d) * 3
    if name == "test_flash_attn_kvcache":
        passes = 4
    return float(bh) * tq * tk * d * passes


def _cfg():
    path = os.environ.get("FA_SELECT_CONFIG")
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


def _grid(fn):
    """The parametrizations of a test function, in pytest's order: (params dict, id) pairs."""
    marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    combos = [({}, [])]
    for m in marks:  # bottom decorator first, as pytest applies them
        names = [n.strip() for n in m.args[0].split(",")] if isinstance(m.args[0], str) else list(m.args[0])
        values = list(m.args[1])
        nxt = []
        for params, ids in combos:
            for i, val in enumerate(values):
                vals = (val,) if len(names) == 1 else tuple(val)
                part = []
                for n, x in zip(names, vals):
                    part.append(str(x) if isinstance(x, (int, float, str, bool, type(None))) else f"{n}{i}")
                nxt.append(({**params, **dict(zip(names, vals))}, ids + part))
        combos = nxt
    return [(params, "-".join(ids)) for params, ids in combos]


def sample_module(ns: dict) -> None:
    """Replace the parametrize marks of each selected test function of the module namespace `ns` by
    one mark holding only the drawn parametrizations (so pytest generates just those), and drop
    the test functions that are not selected. Per test function and requested feature,
    `per_feature` parametrizations are drawn with a fixed seed (crc32 of the test and feature
    names) among those using the feature, costing at most max_work and not skipped by the test
    itself; plus every one costing at most small_work."""
    cfg = _cfg()
    if cfg is None:
        return
    want = set(cfg["features"])
    tests = set(cfg.get("tests") or TESTS)
    per, small, max_work = cfg["per_feature"], cfg["small_work"], cfg["max_work"]
    dtypes = set(cfg.get("dtypes") or [])
    for name in list(ns):
        if not name.startswith("test_") or not callable(ns[name]):
            continue
        if name not in tests or name not in TESTS:
            del ns[name]
            continue
        fn = ns[name]
        grid = _grid(fn)
        pools, ok = {}, {}
        for idx, (params, _) in enumerate(grid):
            feats = features_of(name, params)
            dt = str(params.get("dtype", "")).replace("torch.", "")
            if not (want & set(feats)) or (dtypes and dt not in dtypes):
                continue
            w = work_of(name, params)
            if w > max_work or suite_skips(name, params):
                continue
            ok[idx] = w
            for feat in sorted(want & set(feats)):
                pools.setdefault(feat, []).append(idx)
        chosen = {idx for idx, w in ok.items() if w <= small}
        for feat, pool in sorted(pools.items()):
            rng = random.Random(zlib.crc32(f"{name}/{feat}".encode()))
            chosen.update(rng.sample(pool, min(per, len(pool))))
        if not chosen:
            del ns[name]
            continue
        names = list(grid[0][0])
        picked = [grid[i] for i in sorted(chosen)]
        others = [m for m in getattr(fn, "pytestmark", []) if m.name != "parametrize"]
        fn.pytestmark = others + [pytest.mark.parametrize(
            names, [tuple(p[n] for n in names) for p, _ in picked], ids=[i for _, i in picked]).mark]


def pytest_collection_modifyitems(config, items):
    """Record each item's features, dtype and cost (the drawing happened in sample_module)."""
    if _cfg() is None:
        return
    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
        dt = str(params.get("dtype", "")).replace("torch.", "")
        item.user_properties += [("fa_features", features_of(name, params)), ("fa_dtype", dt),
                                 ("fa_work", work_of(name, params) if name in TESTS else 0.0)]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("time limit of this parametrization reached")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    cfg = _cfg()
    limit = int(cfg["timeout"]) if cfg else 0
    if limit > 0:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
    try:
        yield
    finally:
        if limit > 0:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


_DIFF = re.compile(r"^(Output|dQ|dK|dV|Attention) max diff: (\S+)$|^(Pytorch|dQ Pytorch|dK Pytorch|dV Pytorch|Attention Pytorch) max diff: (\S+)$")


def _ratios(text: str) -> dict:
    ours, theirs = {}, {}
    for line in text.splitlines():
        m = _DIFF.match(line.strip())
        if not m:
            continue
        if m.group(1):
            ours[m.group(1)] = float(m.group(2))
        else:
            key = m.group(3).replace(" Pytorch", "").replace("Pytorch", "Output")
            theirs[key] = float(m.group(4))
    out = {}
    for key, a in ours.items():
        b = theirs.get(key)
        if b is None:
            continue
        out[key] = (a / b) if b > 0 else (0.0 if a == 0 else float("inf"))
    return out


def pytest_runtest_logreport(report):
    cfg = _cfg()
    if cfg is None:
        return
    props = dict(report.user_properties)
    if "fa_features" not in props:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        rec = dict(nodeid=report.nodeid, outcome=report.outcome, features=props["fa_features"],
                   dtype=props["fa_dtype"], work=props["fa_work"], seconds=round(report.duration, 3),
                   ratios=_ratios(report.capstdout))
        if report.outcome == "skipped":
            rec["reason"] = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        elif report.outcome == "failed":
            rec["error"] = str(report.longrepr).splitlines()[-1][:400] if report.longrepr else ""
        with open(cfg["results"], "a") as f:
            f.write(json.dumps(rec) + "\n")
