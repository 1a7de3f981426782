"""`register_backend`: a user's kernel serves `backend=name` behind the package's custom ops.

    import pytorch_mqa
    pytorch_mqa.register_backend("mine", attention=my_attention, validate=True)
    out = pytorch_mqa.attention(q, k, v, causal=True, backend="mine")

The callables are called by the registered ops (`torch.ops.pytorch_mqa.*`), so the backend works
wherever the ops do: the model (`use_backend("mine")`), `PYTORCH_MQA_BACKEND=mine`, and
`torch.compile` (the op stays opaque; its fake impl gives the shapes). The contract:

- `attention(q, k, v, *, causal, scale, return_lse=True) -> (out, lse)`: q (B, Tq, Hq, D),
  k/v (B, Tk, Hkv, D), `scale` a float, causal bottom-right aligned; out (B, Tq, Hq, D) in q's
  dtype, lse (B, Hq, Tq) float32 (-inf for a row that sees no key).
- `attention_with_kv_cache(q, k_cache, v_cache, k, v, *, cache_seqlens, causal, scale,
  return_lse=True) -> (out, lse)`: writes k/v in place into rows [L_b, L_b + Tq), attends
  [0, L_b + Tq) (or [0, L_b) when k, v are None).
- `attention_backward(dout, q, k, v, lse, delta, causal, scale) -> (dq, dk, dv)` (optional): the
  reference's signature (see `pytorch_mqa.reference.attention_backward`); without it, gradients of
  a user backend run the reference backward from the returned lse.

Empty inputs (B, Tq or Tk = 0) never reach the callables: the ops answer them with the reference.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

from pytorch_mqa.ops.backends import USER_BACKENDS, add_backend, remove_backend
from pytorch_mqa.testing.cases import DTYPES
from pytorch_mqa.testing.check import check_backend
from pytorch_mqa.testing.report import Report


def register_backend(
    name: str,
    *,
    attention=None,
    attention_with_kv_cache=None,
    attention_backward=None,
    device_types=None,
    validate: bool = False,
    device=None,
    quick: bool = True,
    dtypes=DTYPES,
) -> list[Report]:
    """Register `name` as a backend of the ops; with `validate=True` check it with the kit first.

    `device_types` (e.g. ("cuda",)) limits the devices it serves (None: any). Validation runs
    `check_backend(name, device=device, quick=quick)` through the registered ops (outputs, LSE and
    gradients, every dtype) and, if any case fails, unregisters the name again and raises
    ValueError listing the failing cases. Registering an existing user name replaces it. Returns
    the validation reports (empty without validation).
    """
    previous = dict(USER_BACKENDS[name]) if isinstance(name, str) and name in USER_BACKENDS else None
    add_backend(name, attention=attention, attention_with_kv_cache=attention_with_kv_cache,
                attention_backward=attention_backward, device_types=device_types)
    if not validate:
        return []
    try:
        reports = check_backend(name, device=device, quick=quick, dtypes=dtypes)
    except Exception:
        _restore(name, previous)
        raise
    failed = [r for r in reports if not r.passed]
    if failed:
        _restore(name, previous)
        details = "\n".join(f"{r.summary()}\n{r.failure_details()}" for r in failed)
        ops = ", ".join(r.op for r in failed)
        raise ValueError(f"{ops}: expected implementations that pass the pytorch_mqa.testing checks, "
                         f"got failing cases; backend {name!r} was not registered:\n{details}")
    return reports


def _restore(name: str, previous: dict | None) -> None:
    remove_backend(name)
    if previous is not None:
        add_backend(name, attention=previous["attention"], attention_with_kv_cache=previous["attention_with_kv_cache"],
                    attention_backward=previous["attention_backward"], device_types=previous["device_types"])


ENTRY_POINT_GROUP = "pytorch_mqa.backends"


def load_backend_plugins() -> list[str]:
    """Run the `pytorch_mqa.backends` entry points of installed packages; return their names.

    A package ships a backend to every `pytorch-mqa` command (info, check) by declaring, e.g. in
    pyproject.toml, `[project.entry-points."pytorch_mqa.backends"] mine = "mypkg.mqa:register"`,
    where `register()` calls `pytorch_mqa.register_backend(...)`. A plugin that fails to load is
    reported with a warning and skipped.
    """
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception as e:  # one broken plugin must not take the command down
            warnings.warn(f"pytorch_mqa backend plugin {ep.name!r} ({ep.value}) failed to load: "
                          f"{type(e).__name__}: {e}", stacklevel=2)
            continue
        loaded.append(ep.name)
    return loaded


def unregister_backend(name: str) -> None:
    """Remove a backend added by register_backend."""
    if name not in USER_BACKENDS:
        raise ValueError(f"name: expected a registered user backend {tuple(USER_BACKENDS)}, got {name!r}")
    remove_backend(name)


__all__ = ["register_backend", "unregister_backend", "load_backend_plugins", "ENTRY_POINT_GROUP"]
