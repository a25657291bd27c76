"""Human-readable dumps of Programs (one line per node, with its module path)."""

from __future__ import annotations

import torch.fx as fx

from qcompile.ir.program import PATH_KEY, Entry, Program


def _fmt(arg: object) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
    return repr(arg)


def format_entry(entry: Entry, program: Program | None = None) -> str:
    lines = [f"entry {entry.name}:"]
    for slot, node in zip(entry.slots, entry.placeholders()):
        extra = ""
        if program is not None and slot.kind.value == "state":
            t = program.state[slot.name]
            extra = f"  {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
        lines.append(f"  %{node.name} = {slot.kind.value}[{slot.name!r}]{extra}")
    for node in entry.graph.graph.nodes:
        if node.op == "placeholder":
            continue
        args = ", ".join([_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()])
        path = node.meta.get(PATH_KEY, "")
        target = node.target if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and hasattr(node.target, "_schema"):
            target = str(node.target)
        comment = f"  # {path}" if path else ""
        lines.append(f"  %{node.name} = {node.op}[{target}]({args}){comment}")
    return "\n".join(lines)


def format_program(program: Program) -> str:
    return "\n\n".join(format_entry(e, program) for e in program.entries.values())
