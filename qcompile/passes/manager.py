"""PassManager: runs a plan's passes in order, verifies after each, reports, dumps, explains failures."""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qcompile.errors import PassError, PlanError, QCompileError
from qcompile.ir.printer import format_program
from qcompile.ir.program import PATH_KEY, Program
from qcompile.ir.verify import verify
from qcompile.passes.base import Pass, PassContext, make_pass
from qcompile.plan import Plan

log = logging.getLogger(__name__)

CAPTURED = "captured"  # what a freshly captured Program provides


@dataclass
class PassReport:
    name: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    nodes_added: int
    nodes_removed: int
    layers_changed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileReport:
    plan: str
    passes: list[PassReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    weight_bytes: dict[str, int] = field(default_factory=dict)
    packed_weight_bytes: int = 0
    capture_seconds: float = 0.0
    backend: dict[str, Any] = field(default_factory=dict)  # what the backend built (target, kernels, fallbacks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompileReport":
        passes = [PassReport(**{**p, "skipped": [tuple(s) for s in p.get("skipped", [])]}) for p in d.get("passes", [])]
        return cls(
            d.get("plan", ""),
            passes,
            list(d.get("warnings", [])),
            dict(d.get("weight_bytes", {})),
            int(d.get("packed_weight_bytes", 0)),
            float(d.get("capture_seconds", 0.0)),
            dict(d.get("backend", {})),
        )

    def summary(self) -> str:
        lines = [f"plan {self.plan}: {len(self.passes)} pass(es)"]
        for p in self.passes:
            lines.append(
                f"  {p.name:<20} {p.seconds:7.2f}s  modified={p.modified}  nodes {p.nodes_before}->{p.nodes_after} "
                f"(+{p.nodes_added}/-{p.nodes_removed})  layers changed {len(p.layers_changed)}  skipped {len(p.skipped)}"
            )
            if p.notes.get("cache_bytes_per_token") is not None:
                n = p.notes
                lines.append(
                    f"    cache: {n['cache_bytes_per_token']} B/token (all layers, scales included) vs fp16 KV "
                    f"{n.get('fp16_kv_bytes_per_token')} B/token: saving x{n.get('saving_vs_fp16_kv')}; {n.get('cached_per_layer', '')}"
                )
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        total = sum(self.weight_bytes.values())
        by = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.weight_bytes.items())
        lines.append(f"  weights: {total / 2**20:.1f} MiB as stored ({by}); {self.packed_weight_bytes / 2**20:.1f} MiB bit-packed")
        b = self.backend
        if b.get("name"):
            lines.append(f"  backend {b['name']}: {b.get('target_description', '')}")
            if b.get("kernels"):
                lines.append(f"    kernels: {len(b['kernels'])} distinct qcompile kernels, {sum(b['kernels'].values())} call sites")
            for kname, c in (b.get("kernel_choices") or {}).items():
                if "unpack_ms" in c:
                    lines.append(f"    {kname}: unpack {c['unpack_ms']} ms vs bit-serial {c['bitserial_ms']} ms at {c['rows']} rows -> {c['chosen']}")
            if b.get("build_seconds") is not None:
                lines.append(f"    lowered in {b.get('lower_seconds')} s, built in {b.get('build_seconds')} s")
            for f in b.get("fallbacks", []):
                lines.append(f"    fallback to torch: {f}")
        return "\n".join(lines)


def _node_ids(program: Program) -> set[tuple[str, str]]:
    return {(e.name, n.name) for e, n in program.nodes()}


class PassManager:
    def __init__(self, plan: Plan, *, dump_dir: str | Path | None = None, verify_deep: bool = True) -> None:
        self.plan = plan
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.verify_deep = verify_deep
        self.passes: list[Pass] = [make_pass(pc.name, pc.options) for pc in plan.passes]
        self.check_order()

    def check_order(self) -> None:
        """Every pass's requirements must be provided by the passes before it (or by capture)."""
        provided = {CAPTURED}
        for i, p in enumerate(self.passes):
            missing = sorted(p.requires - provided)
            if missing:
                before = [q.name for q in self.passes[:i]] or ["(capture only)"]
                raise PlanError(
                    f"pass {p.name!r} (position {i}) requires {missing}, which no earlier pass provides; "
                    f"passes before it: {before}"
                )
            provided |= p.provides

    def rule_warnings(self, program: Program) -> list[str]:
        paths = program.module_paths()
        out = []
        for i, rule in enumerate(self.plan.rules):
            if not any(fnmatch.fnmatchcase(p, rule.match) for p in paths):
                out.append(f"rule {i} (match {rule.match!r}) matches no layer of this model")
        return out

    def run(self, program: Program, ctx: PassContext, report: CompileReport) -> Program:
        for w in self.rule_warnings(program):
            log.warning(w)
            report.warnings.append(w)
        self._dump(program, 0, "captured")
        done: list[str] = []
        for i, p in enumerate(self.passes, start=1):
            before = _node_ids(program)
            t0 = time.perf_counter()
            ctx.at(None, None)
            try:
                result = p.run(program, ctx)
                verify(result.program, deep=self.verify_deep)
            except Exception as e:
                raise self._explain(p, e, ctx, done) from e
            after = _node_ids(result.program)
            program = result.program
            report.passes.append(
                PassReport(
                    name=p.name,
                    seconds=round(time.perf_counter() - t0, 4),
                    modified=result.modified,
                    nodes_before=len(before),
                    nodes_after=len(after),
                    nodes_added=len(after - before),
                    nodes_removed=len(before - after),
                    layers_changed=result.layers_changed,
                    skipped=result.skipped,
                    notes=result.notes,
                )
            )
            for path, reason in result.skipped:
                log.info("%s skipped %s: %s", p.name, path, reason)
            done.append(p.name)
            self._dump(program, i, p.name)
        return program

    def _explain(self, p: Pass, e: Exception, ctx: PassContext, done: list[str]) -> PassError:
        node = ctx.node
        where = ""
        if node is not None:
            entry = ctx.entry.name if ctx.entry is not None else "?"
            where = f" on node %{node.name} ({node.target}) in entry {entry!r}, module path {node.meta.get(PATH_KEY, '')!r}"
        kind = "" if isinstance(e, QCompileError) else f"{type(e).__name__}: "
        return PassError(f"pass {p.name!r} failed{where} after passes {done or ['(none)']}: {kind}{e}")

    def _dump(self, program: Program, index: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{index:02d}_{name}.txt").write_text(format_program(program) + "\n", encoding="utf-8")
