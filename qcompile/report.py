"""The compile report: what each pass did and what the backend built (saved with every artifact).

Plain data with no dependency on passes or backends: each pass writes its own summary lines into
its :class:`PassReport` (``Pass.summarize``), so printing a report, or reading one back from an
artifact, needs no pass code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    summary: list[str] = field(default_factory=list)  # the pass's own one-line readings of its notes


@dataclass
class CompileReport:
    plan: str
    passes: list[PassReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    weight_bytes: dict[str, int] = field(default_factory=dict)
    packed_weight_bytes: int = 0
    capture_seconds: float = 0.0
    backend: dict[str, Any] = field(default_factory=dict)  # what the backend built (target, kernels, fallbacks)
    # plan ``nonfinite: zero``: state key -> {layers, nan, posinf, neginf, numel, first_index, replaced}
    nonfinite: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompileReport:
        passes = [PassReport(**{**p, "skipped": [tuple(s) for s in p.get("skipped", [])]}) for p in d.get("passes", [])]
        return cls(
            d.get("plan", ""),
            passes,
            list(d.get("warnings", [])),
            dict(d.get("weight_bytes", {})),
            int(d.get("packed_weight_bytes", 0)),
            float(d.get("capture_seconds", 0.0)),
            dict(d.get("backend", {})),
            {k: dict(v) for k, v in (d.get("nonfinite") or {}).items()},
        )

    def summary(self) -> str:
        lines = [f"plan {self.plan}: {len(self.passes)} pass(es)"]
        if self.nonfinite:
            total = sum(int(v.get("replaced", 0)) for v in self.nonfinite.values())
            lines.append(
                f"  nonfinite: zero: replaced {total} NaN/Inf value(s) by 0 in {len(self.nonfinite)} tensor(s)"
            )
            for key, v in self.nonfinite.items():
                lines.append(
                    f"    {key} (layer {', '.join(v.get('layers', []))}): {v.get('nan', 0)} NaN, "
                    f"{v.get('posinf', 0)} +Inf, {v.get('neginf', 0)} -Inf of {v.get('numel', '?')} values, first at "
                    f"{v.get('first_index')}"
                )
        for p in self.passes:
            lines.append(
                f"  {p.name:<20} {p.seconds:7.2f}s  modified={p.modified}  nodes {p.nodes_before}->{p.nodes_after} "
                f"(+{p.nodes_added}/-{p.nodes_removed})  layers changed {len(p.layers_changed)}  skipped "
                f"{len(p.skipped)}"
            )
            lines.extend(f"    {line}" for line in p.summary)
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        total = sum(self.weight_bytes.values())
        by = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.weight_bytes.items())
        lines.append(
            f"  weights: {total / 2**20:.1f} MiB as stored ({by}); {self.packed_weight_bytes / 2**20:.1f} MiB "
            "bit-packed"
        )
        b = self.backend
        if b.get("name"):
            lines.append(f"  backend {b['name']}: {b.get('target_description', '')}")
            if b.get("kernels"):
                lines.append(
                    f"    kernels: {len(b['kernels'])} distinct qcompile kernels, {sum(b['kernels'].values())} call "
                    "sites"
                )
            isas = [c["chosen"] for c in (b.get("kernel_choices") or {}).values() if "features" in c]
            if isas:  # issue 21: dot-product kernels picked by the CPU's features
                feats = next(c["features"] for c in b["kernel_choices"].values() if "features" in c)
                lines.append(
                    f"    dot-product kernels: {', '.join(sorted(set(isas)))} for {len(isas)} linear "
                    f"kernels (CPU features: {', '.join(feats)})"
                )
            for kname, c in (b.get("kernel_choices") or {}).items():
                if "unpack_ms" in c:
                    lines.append(
                        f"    {kname}: unpack {c['unpack_ms']} ms vs bit-serial {c['bitserial_ms']} ms at {c['rows']} "
                        f"rows -> {c['chosen']}"
                    )
            tuning = b.get("tuning")
            if tuning:  # issue 20: schedules from a tuning database
                lines.append(
                    f"    tuning database {tuning['db']}: {tuning['applied']} kernels with a record for this target, "
                    f"{len(tuning['untuned'])} without"
                    + "".join(f"; ignored {n} records ({why})" for why, n in tuning["ignored"].items())
                )
                for kname, u in tuning.get("kernels", {}).items():
                    if u.get("tuned"):
                        lines.append(
                            f"    {kname}: untuned {u['untuned_ms']} ms, tuned {u['tuned_ms']} ms -> {u['won']} "
                            f"{u['schedule']}"
                        )
            if b.get("build_seconds") is not None:
                lines.append(f"    lowered in {b.get('lower_seconds')} s, built in {b.get('build_seconds')} s")
            for f in b.get("fallbacks", []):
                lines.append(f"    fallback to torch: {f}")
        return "\n".join(lines)


__all__ = ["CompileReport", "PassReport"]
