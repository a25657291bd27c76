"""CPU targets on the TVM side: the host CPU and the check that an artifact's CPU features are here.

The machine a module is built on decides its instructions (``-mcpu`` of the host), so an artifact
records the target it was built for and refuses to run where that CPU's features are missing.
:class:`CpuTarget` itself lives in :mod:`qcompile.codegen.target` (no TVM import there).
"""

from __future__ import annotations

from qcompile.codegen.target import FEATURES, CpuTarget


def host_target() -> CpuTarget:
    """The CPU this process runs on, with as many threads as TVM will use."""
    return CpuTarget()


def missing_features(recorded: dict[str, object]) -> list[str]:
    """Features a module built for ``recorded`` needs that this host lacks."""
    host = host_target()
    return sorted(set(map(str, recorded.get("features", []))) - host.features)  # type: ignore[arg-type]


__all__ = ["FEATURES", "CpuTarget", "host_target", "missing_features"]
