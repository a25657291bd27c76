"""The non-finite guard: NaN/±Inf in a Program's state (weights, buffers, constants), checked
before any pass runs.

One NaN weight would otherwise become a NaN scale (and a zeroed channel, or NaN logits) far from
its cause. :func:`guard_state` looks at every floating-point state tensor once; under the plan's
``nonfinite: error`` (the default) it raises a :class:`~qcompile.errors.NonFiniteError` naming each
bad tensor (its state key, the layers that use it, with their module class), how many NaN / +Inf /
-Inf it holds and where the first one is; under ``nonfinite: zero`` it replaces those values by 0
(new tensors: the user's model is never modified) and returns what it replaced, per tensor, for the
compile report. Integer state (quantized codes, token tables) cannot hold NaN and is skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.fx as fx

from qcompile.errors import NonFiniteError
from qcompile.ir.program import PATH_KEY, Program, SlotKind
from qcompile.plan import NonFinite
from qcompile.quant.finite import nonfinite_counts, replace_nonfinite

log = logging.getLogger(__name__)

MAX_LISTED = 8  # tensors named one by one in the error message


def _users(program: Program) -> dict[str, list[str]]:
    """State key -> ``"module.path (Class)"`` of every layer whose nodes read it, in graph order."""
    out: dict[str, list[str]] = {}
    for entry in program.entries.values():
        for node, slot in entry.bindings().items():
            if slot.kind is not SlotKind.STATE:
                continue
            names = out.setdefault(slot.name, [])
            for user in node.users:
                label = _layer(user)
                if label and label not in names:
                    names.append(label)
    return out


def _layer(node: fx.Node) -> str:
    path = str(node.meta.get(PATH_KEY, "") or "")
    if not path:
        return ""
    stack = node.meta.get("nn_module_stack") or {}
    cls = str(list(stack.values())[-1][1]).rsplit(".", 1)[-1] if stack else ""
    return f"{path!r} ({cls})" if cls else repr(path)


def guard_state(program: Program, policy: NonFinite | str = NonFinite.ERROR) -> dict[str, dict[str, Any]]:
    """Check every floating-point state tensor of ``program`` for NaN/±Inf (see the module docstring).

    Returns ``{state key: {"layers": [...], "nan": n, "posinf": n, "neginf": n, "numel": n,
    "first_index": [...], "replaced": n}}`` for the tensors replaced under ``zero`` (empty when
    everything is finite)."""
    policy = NonFinite(policy)
    bad = {key: c for key, t in program.state.items() if (c := nonfinite_counts(t)) is not None}
    if not bad:
        return {}
    users = _users(program)
    found = {
        key: {"layers": users.get(key) or [repr(key.rsplit(".", 1)[0])], **c.to_dict(), "replaced": c.total}
        for key, c in bad.items()
    }
    if policy is NonFinite.ERROR:
        lines = [
            f"  {key!r} of layer {', '.join(f['layers'])}: {bad[key].describe()}"
            for key, f in list(found.items())[:MAX_LISTED]
        ]
        more = len(found) - MAX_LISTED
        if more > 0:
            lines.append(f"  ... and {more} more tensor(s)")
        raise NonFiniteError(
            f"{len(found)} state tensor(s) of the model hold NaN or Inf values:\n"
            + "\n".join(lines)
            + "\n  Fix the model's weights (a diverged checkpoint, a bad conversion or an overflowing cast), or set "
            "the plan option `nonfinite: zero` to replace them by 0 (the compile report lists every replacement)."
        )
    for key in bad:
        program.state[key] = replace_nonfinite(program.state[key])
        log.warning(
            "nonfinite: zero: replaced %d non-finite value(s) of %r (layer %s) by 0",
            bad[key].total,
            key,
            ", ".join(found[key]["layers"]),
        )
    return found


__all__ = ["guard_state"]
