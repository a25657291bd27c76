"""Where the time of one call of a TVM-compiled entry goes (e.g. one decode step of a causal LM).

:func:`profile_entry` times the same call three ways, each figure the fastest of several calls (on a
shared machine, the least disturbed one):

* ``call_ms``: :meth:`CompiledModule.run_entry` end to end (input checks, argument assembly, the VM
  call, outputs back to torch); ``step_ms`` (``decode``): one step of ``generate()``'s loop
  (:meth:`CompiledModule._decode_step`);
* ``vm_ms``: the bare Relax VM function on prepared arguments (the VM itself, kernels included);
* ``kernel_ms``: a second VM on the same executable, with an instrument, records every kernel call of
  one step (function and arguments); the calls are then replayed in the step's order, each timed
  alone minus what calling a function with the same arguments costs from Python (the VM builtin
  ``make_tuple`` on them), and grouped into ``lm_head`` (the kernel whose output is ``vocab`` wide),
  ``attention`` (``*attention*`` kernels), ``cache_write`` (``*index_copy*``), ``linear`` (the other
  ``qc_*`` kernels) and ``other`` (TVM's fused elementwise, norm and rotary kernels); the VM's
  builtins (allocation, shape checks) are counted per name.

``vm_overhead_ms`` = ``vm_ms`` − the kernels' sum: what the VM spends between kernels (argument
checks, allocation, instruction dispatch); ``python_ms`` = ``step_ms`` (else ``call_ms``) − ``vm_ms``.
Compare figures of one run: each kernel counts with its fastest of several replays, so the kernels'
sum leans low and the VM overhead high.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

CATEGORIES = ("linear", "lm_head", "attention", "cache_write", "other")


@dataclass
class EntryProfile:
    entry: str
    call_ms: float
    step_ms: float | None  # decode: one step of generate()'s loop
    vm_ms: float
    kernel_ms: dict[str, float]  # category -> ms per call
    kernel_calls: dict[str, int]  # category -> calls per call
    builtin_calls: dict[str, int] = field(default_factory=dict)  # VM builtin -> calls per call
    vm_args: int = 0  # arguments the VM function takes

    @property
    def kernels_total_ms(self) -> float:
        return sum(self.kernel_ms.values())

    @property
    def vm_overhead_ms(self) -> float:
        return self.vm_ms - self.kernels_total_ms

    @property
    def python_ms(self) -> float:
        """What the runtime adds around the VM call (generate()'s step for decode, else run_entry)."""
        return (self.call_ms if self.step_ms is None else self.step_ms) - self.vm_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "call_ms": round(self.call_ms, 4),
            "step_ms": None if self.step_ms is None else round(self.step_ms, 4),
            "vm_ms": round(self.vm_ms, 4),
            "python_ms": round(self.python_ms, 4),
            "vm_overhead_ms": round(self.vm_overhead_ms, 4),
            "kernels_total_ms": round(self.kernels_total_ms, 4),
            "kernel_ms": {k: round(v, 4) for k, v in self.kernel_ms.items()},
            "kernel_calls": self.kernel_calls,
            "builtin_calls": self.builtin_calls,
            "vm_args": self.vm_args,
        }


def _category(symbol: str, args: tuple, vocab: int | None) -> str:
    if "attention" in symbol:
        return "attention"
    if "index_copy" in symbol:
        return "cache_write"
    shape = getattr(args[-1], "shape", None) if args else None  # kernels write their last argument
    if vocab is not None and shape is not None and len(shape) and int(shape[-1]) == vocab:
        return "lm_head"
    return "linear" if symbol.startswith("qc_") else "other"


def _best_ms(fn: Any, steps: int) -> float:
    """The fastest of ``steps`` calls, in ms: on a shared machine the least disturbed one."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def profile_entry(
    cm: Any, entry: str, inputs: list[torch.Tensor], steps: int = 20, vocab: int | None = None
) -> EntryProfile:
    """Profile ``steps`` calls of ``cm``'s TVM entry ``entry`` on ``inputs`` (user inputs, in order).
    The calls run the entry for real: a decode step rewrites the same cache row each time."""
    import tvm
    from tvm import relax

    backend = cm._backend
    runner = cm._built[entry]
    if getattr(backend, "executable", None) is None or not hasattr(runner, "prepare"):
        raise ValueError(f"{entry!r} is not a TVM entry on the CPU; profile_entry needs the tvm backend")
    for _ in range(2):  # warm up (pooled allocator, caches)
        cm.run_entry(entry, *inputs)
    call_ms = _best_ms(lambda: cm.run_entry(entry, *inputs), steps)
    step_ms = None
    if entry == "decode" and hasattr(cm, "_decode_step"):  # generate()'s own loop body
        step = cm._decode_step()
        token, position = inputs[0], int(inputs[1].reshape(-1)[0])
        step(token, position)
        step_ms = _best_ms(lambda: step(token, position), steps)
    fn, args = runner.prepare(cm._build_args(cm.program.entries[entry], inputs))
    vm_ms = _best_ms(lambda: fn(*args), steps)

    vm = relax.VirtualMachine(backend.executable, tvm.cpu())
    ifn, iargs = runner.prepare(cm._build_args(cm.program.entries[entry], inputs), vm=vm)
    calls: list[tuple[str, Any, tuple]] = []
    builtins: Counter[str] = Counter()

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            if symbol.startswith("vm.builtin."):
                builtins[symbol.removeprefix("vm.builtin.")] += 1
            else:
                calls.append((symbol, func, args))
        return 0

    vm.set_instrument(instrument)
    ifn(*iargs)
    # replay the kernels in the step's order, each timed alone; minus what calling a function with as many
    # arguments costs from Python (vm.builtin.make_tuple on the same arguments)
    probe = tvm.get_global_func("vm.builtin.make_tuple")
    cats = {sym: _category(sym, args, vocab) for sym, _, args in calls}
    best = [float("inf")] * len(calls)
    for _ in range(max(3, steps // 2) + 1):  # the first round warms up
        for i, (_, func, cargs) in enumerate(calls):
            t0 = time.perf_counter()
            func(*cargs)
            t1 = time.perf_counter()
            probe(*cargs)
            t2 = time.perf_counter()
            best[i] = min(best[i], max((t1 - t0) - (t2 - t1), 0.0))
    kernel_ms = dict.fromkeys(CATEGORIES, 0.0)
    kernel_calls = dict.fromkeys(CATEGORIES, 0)
    for (sym, _, _), t in zip(calls, best):
        kernel_ms[cats[sym]] += t * 1e3
        kernel_calls[cats[sym]] += 1
    return EntryProfile(
        entry=entry,
        call_ms=call_ms,
        step_ms=step_ms,
        vm_ms=vm_ms,
        kernel_ms=kernel_ms,
        kernel_calls=kernel_calls,
        builtin_calls=dict(builtins.most_common()),
        vm_args=len(args),
    )


__all__ = ["CATEGORIES", "EntryProfile", "profile_entry"]
