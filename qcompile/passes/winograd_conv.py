"""winograd_conv: 3×3 convolutions → ``qcompile::winograd_conv2d`` (NOVA-style F(m, 3)).

What it does: every ``aten.conv2d`` whose weight is a constant ``[C_out, C_in, 3, 3]`` tensor, with
stride 1, dilation 1 and groups 1 — or a depthwise one (groups = C_in = C_out), whose per-point
"GEMM" is an elementwise product — (found by graph matching), and whose module path matches one of
``layers``, is replaced by the Winograd op. The weight is transformed once at compile time in
float64 (``U = G g Gᵀ``) from exactly-verified rational transforms; inputs of any size and any
zero padding work (edge tiles are padded and cropped).

Per layer, the tile ``m`` and the point set come from the options, with ``overrides`` —
``[[glob, m, points], ...]`` — applied in order (later wins). ``points`` is a named set
(``"best"``, ``"integer"``, ``"fractional"``, ``"nova"``, ``"searched"``; see
:data:`qcompile.quant.winograd.POINT_SETS`) or explicit rationals ``"0,5/6,-5/6,7/6,-7/6"``.
``fp16=True`` runs the op in fp16 with fp32 accumulation (see the op's docstring).

Not converted (listed in ``skipped`` with the reason): kernels other than 3×3, strides or
dilations other than 1, grouped convolutions that are not depthwise (not implemented), string
padding, non-constant weights. A layer named
exactly (no wildcard) in ``layers`` or ``overrides`` that cannot be converted is an error.

Requires: float convolutions. Provides: winograd; invalidates: float convolutions (it runs once).
Guarantees: converted layers compute the same convolution (fp32: within float rounding of the
transforms); transform matrices and weights are new state tensors.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.errors import PassError, PlanError
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import state_key
from qcompile.ir.program import PATH_KEY, Entry, Program, Slot
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.quant import winograd
from qcompile.quant.finite import naming

aten = torch.ops.aten
WILDCARDS = set("*?[")


def resolve_points(m: int, points: str) -> tuple[Any, ...]:
    """The finite points of F(m, 3) for a named set or an explicit comma-separated list."""
    if "," in points or "/" in points or points.lstrip("-").isdigit():
        return winograd.as_points([p.strip() for p in points.split(",") if p.strip()])
    name = points
    if name == "best":
        name = winograd.BEST.get(m, "integer")
    key = (m, name)
    if key not in winograd.POINT_SETS:
        names = sorted({n for (mm, n) in winograd.POINT_SETS if mm == m} | {"best"})
        raise PlanError(
            f"no point set {points!r} for F({m},3); named sets: {names}, or explicit rationals '0,1,-1,...'"
        )
    return winograd.POINT_SETS[key]


@dataclass(frozen=True)
class Override:
    """Tile and points for the layers matching ``match`` (written ``[glob, m, points]`` in a plan)."""

    POSITIONAL: ClassVar[bool] = True
    match: str
    m: int
    points: str


@register_pass
@dataclass(frozen=True)
class WinogradConv(Pass):
    name: ClassVar[str] = "winograd_conv"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_CONVS})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.WINOGRAD})
    invalidates: ClassVar[frozenset[Fact]] = frozenset({Fact.FLOAT_CONVS})

    m: int = 4
    points: str = "best"
    fp16: bool = False
    layers: tuple[str, ...] = ("*",)
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        if self.m < 2 or self.m > 8:
            raise PlanError(f"winograd_conv: m must be in [2, 8], got {self.m}")
        for o in self.overrides:
            if not isinstance(o, Override):
                raise PlanError(f"winograd_conv: each override is [glob, m, points], got {o!r}")
        for m, points in [(self.m, self.points), *((o.m, o.points) for o in self.overrides)]:
            try:  # checked when the plan is read, before anything is captured
                winograd.transforms(resolve_points(m, points), m, 3)
            except ValueError as e:
                raise PlanError(f"winograd_conv: points {points!r} for F({m},3): {e}") from None

    def _config(self, path: str) -> tuple[int, str] | None:
        if not any(fnmatch.fnmatchcase(path, g) for g in self.layers):
            return None
        m, points = self.m, self.points
        for o in self.overrides:
            if fnmatch.fnmatchcase(path, o.match):
                m, points = o.m, o.points
        return m, points

    def _named_exactly(self, path: str) -> bool:
        globs = list(self.layers) + [o.match for o in self.overrides]
        return any(g == path and not (set(g) & WILDCARDS) for g in globs)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cache: dict[tuple[str, int, tuple[Any, ...]], list[str]] = {}
        changed: list[str] = []
        skipped: dict[str, str] = {}
        touched: set[str] = set()
        for entry in program.entries.values():
            bindings = entry.bindings()
            for node in list(entry.graph.graph.nodes):
                if node.op != "call_function" or node.target != aten.conv2d.default:
                    continue
                ctx.at(entry, node)
                path = str(node.meta.get(PATH_KEY, ""))
                cfg = self._config(path)
                if cfg is None:
                    skipped[path] = f"not selected by the pass's layers {list(self.layers)}"
                    continue
                reason, wkey = self._ineligible(program, bindings, node)
                if reason:
                    if self._named_exactly(path):
                        raise PlanError(f"winograd_conv: layer {path!r} was named in the plan but {reason}")
                    skipped[path] = reason
                    continue
                m, pts_name = cfg
                pts = resolve_points(m, pts_name)
                key = (wkey, m, pts)
                if key not in cache:
                    with naming(f"layer {path!r} (weight {wkey!r})"):
                        cache[key] = self._make_state(program, wkey, m, pts)
                self._replace(entry, node, cache[key], m)
                touched.add(entry.name)
                if path not in changed:
                    changed.append(path)
        ctx.at(None, None)
        if not changed and not skipped:
            raise PassError(
                f"winograd_conv found no convolution in entries {list(program.entries)}; expected aten.conv2d with a "
                "constant 3x3 weight (a model without convolutions has nothing for this pass to do)"
            )
        program.finish_rewrite(touched)
        return PassResult(
            program,
            modified=bool(changed),
            layers_changed=changed,
            skipped=sorted(skipped.items()),
            notes={"fp16": self.fp16},
        )

    @staticmethod
    def _ineligible(program: Program, bindings: dict[fx.Node, Slot], node: fx.Node) -> tuple[str, str]:
        args = list(node.args) + [None] * (7 - len(node.args))
        _, w, _, stride, padding, dilation, groups = args[:7]
        wkey = state_key(bindings, w)
        if wkey is None:
            return "its weight is not a constant", ""
        shape = tuple(program.state[wkey].shape)
        if len(shape) != 4 or shape[2:] != (3, 3):
            return f"its kernel is {'x'.join(map(str, shape[2:]))}, not 3x3", wkey
        if list(stride or [1, 1]) not in ([1, 1], [1]):
            return f"stride {list(stride)} (Winograd F(m,3) here needs stride 1)", wkey
        if list(dilation or [1, 1]) not in ([1, 1], [1]):
            return f"dilation {list(dilation)} (needs 1)", wkey
        groups = groups or 1
        cin = shape[1] * groups
        if groups != 1 and not (groups == cin == shape[0] and shape[1] == 1):
            return f"it is a grouped convolution (groups={groups}, not depthwise); not implemented", wkey
        if isinstance(padding, str) or len(list(padding or [0, 0])) not in (1, 2):
            return f"padding {padding!r} is not a pair of integers", wkey
        return "", wkey

    @staticmethod
    def _make_state(program: Program, wkey: str, m: int, pts: tuple[Any, ...]) -> list[str]:
        t = winograd.transforms(pts, m, 3)
        winograd.verify(t, trials=2)
        AT, G, BT = (torch.tensor(a) for a in t.as_arrays())
        base = wkey.removesuffix(".weight")
        return [
            program.add_state(f"{base}.winograd_U", winograd.transform_weight(program.state[wkey], G)),
            program.add_state(f"{base}.winograd_AT", AT.to(torch.float32)),
            program.add_state(f"{base}.winograd_BT", BT.to(torch.float32)),
        ]

    def _replace(self, entry: Entry, node: fx.Node, keys: list[str], m: int) -> None:
        args = list(node.args) + [None] * (7 - len(node.args))
        x, _, bias, _, padding = args[:5]
        pad = list(padding or [0, 0])
        pad = pad * 2 if len(pad) == 1 else pad
        u, at, bt = (entry.state_input(k) for k in keys)
        entry.replace_call(
            node, torch.ops.qcompile.winograd_conv2d.default, (x, u, at, bt, bias, m, [int(p) for p in pad], self.fp16)
        )
