"""Program verifier, run after every pass.

Checks: each graph lints; placeholders and slots agree one to one; every STATE/CACHE slot names
an existing tensor/cache spec; every call target is an ATen/qcompile op or a plain Python
operator; every quantized op's weight codes have a recorded bit width; and (``deep=True``) the
graph runs under FakeTensorMode on its example inputs, which catches shape and dtype errors
without computing anything.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.errors import VerifyError
from qcompile.ir.program import PATH_KEY, Entry, Program, SlotKind

# ops whose second argument is one-code-per-byte weight codes: their width must be a Program fact
CODE_OPS = frozenset({"qcompile::linear_w8a8", "qcompile::quant_linear", "qcompile::linear_static"})


def _target_ok(target: object) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    mod = getattr(target, "__module__", "") or ""
    return target in vars(operator).values() or mod in ("builtins", "math", "_operator") or mod.startswith("torch")


def verify(program: Program, deep: bool = True) -> None:
    """Raise :class:`VerifyError` naming the entry and node when the Program is inconsistent."""
    for entry in program.entries.values():
        _verify_entry(program, entry)
        if deep:
            _fake_run(program, entry)


def _verify_entry(program: Program, entry: Entry) -> None:
    where = f"entry {entry.name!r}"
    try:
        entry.graph.graph.lint()
    except Exception as e:
        raise VerifyError(f"{where}: graph is malformed: {e}") from e
    placeholders = entry.placeholders()
    if len(placeholders) != len(entry.slots):
        raise VerifyError(f"{where}: {len(placeholders)} placeholders but {len(entry.slots)} slots")
    users = [s for s in entry.slots if s.kind is SlotKind.USER]
    if len(users) != len(entry.user_inputs) or len(users) != len(entry.examples):
        raise VerifyError(
            f"{where}: {len(users)} user slots, {len(entry.user_inputs)} input specs, {len(entry.examples)} examples"
        )
    for slot, node in zip(entry.slots, placeholders):
        if slot.kind is SlotKind.STATE and slot.name not in program.state:
            raise VerifyError(f"{where}: placeholder %{node.name} is bound to missing state {slot.name!r}")
        if slot.kind is SlotKind.CACHE and slot.name not in program.cache_specs:
            raise VerifyError(f"{where}: placeholder %{node.name} is bound to unknown cache {slot.name!r}")
    bindings = dict(zip(placeholders, entry.slots))
    for node in entry.graph.graph.nodes:
        if (
            node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and node.target.name() in CODE_OPS
        ):
            slot = bindings.get(node.args[1]) if len(node.args) > 1 else None
            if slot is None or slot.kind is not SlotKind.STATE:
                raise VerifyError(
                    f"{where}: node %{node.name} ({node.target}) reads weight codes that are not a state tensor"
                )
            if slot.name not in program.weight_bits:
                raise VerifyError(
                    f"{where}: node %{node.name} ({node.target}) at module path {node.meta.get(PATH_KEY, '')!r} reads "
                    "codes "
                    f"{slot.name!r} whose bit width the Program does not record (Program.weight_bits)"
                )
        if node.op in ("call_module", "call_method", "get_attr"):
            raise VerifyError(
                f"{where}: node %{node.name} ({node.meta.get(PATH_KEY, '')}) is a {node.op}; only call_function is "
                "allowed"
            )
        if node.op == "call_function" and not _target_ok(node.target):
            raise VerifyError(
                f"{where}: node %{node.name} calls {node.target!r}, which is neither an op nor an operator"
            )


def _fake_run(program: Program, entry: Entry) -> None:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    user = iter(entry.examples)
    with mode:
        args = []
        for slot in entry.slots:
            if slot.kind is SlotKind.STATE:
                args.append(mode.from_tensor(program.state[slot.name]))
            elif slot.kind is SlotKind.CACHE:
                shape, dt = program.cache_specs[slot.name]
                args.append(torch.zeros(shape, dtype=getattr(torch, dt)))
            else:
                args.append(mode.from_tensor(next(user)))
        interp = _NodeTrackingInterpreter(entry.graph)
        try:
            interp.run(*args)
        except Exception as e:
            node = interp.current
            where = f"node %{node.name} ({node.target}) at module path {node.meta.get(PATH_KEY, '')!r}" if node else "?"
            raise VerifyError(
                f"entry {entry.name!r}: shape/dtype check failed at {where}: {type(e).__name__}: {e}"
            ) from e


class _NodeTrackingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node):  # type: ignore[override]
        self.current = n
        return super().run_node(n)
