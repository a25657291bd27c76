"""CompiledModule: what ``qcompile.compile`` returns and ``qcompile.load`` brings back.

* ``cm(*inputs)`` runs the ``forward`` entry (inputs checked against the captured specs, and the
  values of inputs the graph uses as indices against the tensors they index: see
  :mod:`qcompile.ir.bounds`; a rejected call runs no kernel, so the cache is left as it was);
* ``cm.generate(input_ids, max_new_tokens)`` runs ``prefill`` once and ``decode`` per new token
  over the Program's static cache (greedy, or sampling with temperature / top-k / top-p);
* ``cm.report`` is the compile report, ``cm.save(dir)`` writes an artifact.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from qcompile.codegen import get_backend
from qcompile.codegen.base import BuiltEntry
from qcompile.codegen.target import Target, parse_target
from qcompile.errors import InputError, QCompileError
from qcompile.ir.bounds import EntryBounds, IndexBound, index_bounds
from qcompile.ir.program import Entry, Program, SlotKind
from qcompile.plan import Plan
from qcompile.report import CompileReport

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first new token comes from prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class CompiledModule:
    def __init__(
        self,
        program: Program,
        plan: Plan,
        *,
        target: str | Target = "cpu",
        backend: str | None = None,
        report: CompileReport | None = None,
        tokenizer: Any = None,
        artifact: Path | None = None,
        tuning: Any = None,
    ) -> None:
        self.program = program
        self.plan = plan
        # the target string and the plan's arch, reconciled once (a conflict is an error naming both)
        parsed = parse_target(target, plan.arch) if isinstance(target, str) else target
        self.target = str(parsed)  # as written, with the plan's arch filled in ("cuda" + sm_86 -> "cuda:sm_86")
        self._backend = get_backend(backend, parsed)
        self.backend = self._backend.name
        self.report = report or CompileReport(plan.name)
        self.tokenizer = tokenizer
        fc = plan.float_compute.value
        self._built: dict[str, BuiltEntry] = self._backend.build(
            program,
            parsed,
            allow_fallback=plan.fallback == "torch",
            artifact=artifact,
            tuning=tuning,
            float_compute=fc,
        )
        if self._backend.info:
            self.report.backend = {"name": self.backend, **self._backend.info}
        if fc != "fp32":
            self._note_float_compute(fc)
        self._cache: dict[str, torch.Tensor] = program.new_cache()
        self._out_specs = {name: pytree.treespec_loads(e.out_spec) for name, e in program.entries.items()}
        self.last_generation: GenerationStats | None = None
        self.index_bounds: dict[str, EntryBounds] = self._derive_bounds()
        self._check_indices = True  # private switch: benchmarks/input_checks.py times calls without the check
        self._fast_decode = True  # private switch: False makes every decode step a run_entry call (as before)
        limit = self.token_limit()
        size = _length(tokenizer)
        if limit is not None and size is not None and size > limit:
            log.warning(
                "the tokenizer has %d tokens but the model only %d token ids: prompts with ids >= %d will be refused",
                size,
                limit,
                limit,
            )

    def _note_float_compute(self, fc: str) -> None:
        """A warning for every weight-only linear the plan's ``float_compute`` did not reach, and why."""
        info = self._backend.info.get("float_compute")
        if info is None:
            notes = [f"float_compute {fc}: the {self.backend} backend computes every float linear in fp32"]
        else:
            fp32 = list(info.get("fp32", []))
            shown = "; ".join(fp32[:5]) + (f"; and {len(fp32) - 5} more" if len(fp32) > 5 else "")
            notes = [f"float_compute {fc}: {len(fp32)} weight-only linear(s) run fp32: {shown}"] if fp32 else []
        for note in notes:
            log.warning(note)
            if note not in self.report.warnings:
                self.report.warnings.append(note)

    def _derive_bounds(self) -> dict[str, EntryBounds]:
        """Index bounds of every entry, from its graph and the shapes of the tensors the kernels get
        (never from the manifest); an index the matcher cannot bound is warned about and noted."""
        shapes = {k: tuple(t.shape) for k, t in self.program.state.items()}
        shapes.update({k: tuple(t.shape) for k, t in self._cache.items()})
        out = {name: index_bounds(e, shapes) for name, e in self.program.entries.items()}
        for name, eb in out.items():
            for u in eb.unbounded:
                note = f"unchecked index input: {u.describe(name)}; its values are not checked before the kernels run"
                log.warning(note)
                if note not in self.report.warnings:
                    self.report.warnings.append(note)
        return out

    # ---- calling ---------------------------------------------------------------------------
    @property
    def entries(self) -> list[str]:
        return list(self.program.entries)

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        return self.run_entry("forward", *args, **kwargs)

    def run_entry(self, name: str, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        """Run entry ``name`` on user inputs (positional or by name); outputs as the model's."""
        if name not in self.program.entries:
            raise InputError(f"this module has no entry {name!r}; entries: {self.entries}")
        inputs = self._checked_inputs(name, args, kwargs, indices=self._check_indices)
        flat = self._build_args(self.program.entries[name], inputs)
        out = self._built[name](flat)
        return pytree.tree_unflatten(list(out), self._out_specs[name])

    def _checked_inputs(self, name: str, args: tuple, kwargs: dict, *, indices: bool = True) -> list[torch.Tensor]:
        """The user inputs of a call of entry ``name``, bound and checked (specs, and index values
        unless ``indices`` is False), without running it."""
        entry = self.program.entries[name]
        inputs = _bind(entry, args, kwargs)
        check_inputs(entry, inputs)
        if indices:
            check_index_values(name, self.index_bounds[name].bounds, inputs)
        return inputs

    def cache_limit(self) -> int:
        """How many tokens the cache holds: the rows ``decode``'s cache writes may reach, from the
        graph and the cache tensors (the manifest's ``max_cache_len`` only when no bound is found)."""
        his = [b.hi for b in self.index_bounds.get("decode", EntryBounds()).bounds if b.table is SlotKind.CACHE]
        if his:
            return min(his)
        try:
            return int(self.program.meta["max_cache_len"])
        except (KeyError, TypeError, ValueError):
            raise QCompileError("this module records no cache length, so it cannot generate") from None

    def token_limit(self) -> int | None:
        """Token ids must be below this: the rows of the table the first input of ``prefill`` (or
        ``forward``) indexes, from the graph; None when that input indexes nothing bounded."""
        for name in ("prefill", "forward"):
            if name in self.index_bounds:
                his = [b.hi for b in self.index_bounds[name].bounds if b.position == 0 and not b.element]
                return min(his) if his else None
        return None

    def _build_args(self, entry: Entry, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        user = iter(inputs)
        args = []
        for slot in entry.slots:
            if slot.kind is SlotKind.STATE:
                args.append(self.program.state[slot.name])
            elif slot.kind is SlotKind.CACHE:
                args.append(self._cache[slot.name])
            else:
                args.append(next(user))
        return args

    def reset_cache(self) -> None:
        for t in self._cache.values():
            t.zero_()

    # ---- generation ------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids[1, P]``; returns ``[1, P + n]`` (stops early at an EOS token).

        ``eos_token_id=None`` uses the model's EOS tokens; pass ``[]`` to never stop early.
        """
        if self.program.kind != "causal_lm" or not {"prefill", "decode"} <= set(self.program.entries):
            raise QCompileError("generate() needs a causal LM compiled with its prefill/decode steps")
        check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise InputError(f"generate() takes input_ids of shape [1, prompt_len] (batch 1), got {got}")
        if input_ids.dtype != torch.int64:
            raise InputError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
        prompt_len = int(input_ids.shape[1])
        if prompt_len == 0:
            raise InputError("the prompt is empty: give at least one token")
        limit = self.cache_limit()
        if prompt_len + max_new_tokens > limit:
            raise InputError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) is more than the compiled cache "
                f"length {limit}; shorten them or recompile with a larger max_cache_len"
            )
        # every call below checks its own inputs; checking the prompt and the last decode position here
        # refuses a generation that would fail half way, before the cache is reset
        self._checked_inputs("prefill", (input_ids, torch.arange(prompt_len)), {})
        if max_new_tokens >= 2:
            self._checked_inputs("decode", (input_ids[:, :1], torch.tensor([prompt_len + max_new_tokens - 2])), {})
        eos = (
            set(self.program.meta.get("eos_token_id") or [])
            if eos_token_id is None
            else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        )
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reset_cache()
        tokens = input_ids.clone()
        if max_new_tokens == 0:
            return tokens
        t0 = time.perf_counter()
        logits = self.run_entry("prefill", input_ids, torch.arange(prompt_len))
        t1 = time.perf_counter()
        nxt = _pick(logits[0, -1], do_sample, temperature, top_k, top_p, gen)
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        step = self._decode_step()
        while tokens.shape[1] < prompt_len + max_new_tokens and int(nxt) not in eos:
            logits = step(nxt.view(1, 1), tokens.shape[1] - 1)
            nxt = _pick(logits[0, -1], do_sample, temperature, top_k, top_p, gen)
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        t2 = time.perf_counter()
        self.last_generation = GenerationStats(prompt_len, tokens.shape[1] - prompt_len, t1 - t0, t2 - t1)
        return tokens

    def _decode_step(self) -> Callable[[torch.Tensor, int], Any]:
        """``step(token[1, 1], position) -> logits`` for generate()'s loop. The first step is a checked
        :meth:`run_entry` call; later ones, where the backend can repeat a call with new user inputs
        (the TVM backend: the cache and weight arguments stay as they were), skip the per-slot argument
        assembly and the generic input checks. Those checks are not lost: generate() has checked the
        last position before the loop (positions only grow), and each token id is checked here against
        the embedding's rows (one scalar compare) before it reaches a kernel."""
        entry = self.program.entries["decode"]
        built = self._built["decode"]
        spec = self._out_specs["decode"]
        repeat = getattr(built, "call_user", None) if self._fast_decode else None
        limit = self.token_limit()
        warm = [False]

        def step(token: torch.Tensor, position: int) -> Any:
            pos = torch.tensor([position])
            if repeat is None or not warm[0]:
                warm[0] = True
                return self.run_entry("decode", token, pos)
            tok = int(token)
            if limit is not None and not 0 <= tok < limit:  # e.g. a head wider than the embedding
                self._checked_inputs("decode", (token, pos), {})  # raises InputError naming the input
            out = repeat(_bind(entry, (token, pos), {}))
            return pytree.tree_unflatten(list(out), spec)

        return step

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write an artifact directory atomically (safetensors + JSON)."""
        from qcompile.runtime.artifact import save_artifact

        return save_artifact(self, Path(path))

    def export_onnx(
        self,
        path: str | Path,
        format: str = "qdq",
        *,
        entry: str | None = None,
        external_data: bool | None = None,
    ) -> Any:
        """Write entry ``entry`` (default: ``prefill`` for a causal LM, with its KV cache as explicit
        past/present inputs and outputs; else ``forward``) as an ONNX model at ``path``, in format ``qdq``
        (standard QuantizeLinear/DequantizeLinear) or ``ort`` (onnxruntime contrib ops); returns an
        :class:`~qcompile.runtime.onnx_export.OnnxExport`. See :mod:`qcompile.runtime.onnx_export`."""
        from qcompile.runtime.onnx_export import export_onnx

        return export_onnx(self, path, format, entry=entry, external_data=external_data)

    def __repr__(self) -> str:
        return (
            f"CompiledModule(plan={self.plan.name!r}, target={self.target!r}, backend={self.backend!r}, "
            f"entries={self.entries})"
        )


def _pick(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator | None,
) -> torch.Tensor:
    logits = logits.to(torch.float32)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[0]


def _length(tokenizer: Any) -> int | None:
    try:
        return int(len(tokenizer)) if tokenizer is not None else None
    except (TypeError, ValueError):
        return None


def check_sampling(
    max_new_tokens: Any, do_sample: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any = None
) -> None:
    """Raise InputError unless generate()'s parameters are usable (NaN and infinities never are)."""

    def integer(x: Any) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def real(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))

    if not integer(max_new_tokens) or int(max_new_tokens) < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, (bool, numbers.Integral)):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}")
    if not real(temperature):
        raise InputError(f"temperature must be a finite number, got {temperature!r}")
    if do_sample and float(temperature) <= 0:
        raise InputError(
            f"temperature must be > 0 when sampling, got {temperature!r}; for greedy decoding do not sample"
        )
    if top_k is not None and (not integer(top_k) or int(top_k) < 0):
        raise InputError(f"top_k must be an integer >= 0 (0 or None: no top-k), got {top_k!r}")
    if top_p is not None and (not real(top_p) or not 0 < float(top_p) <= 1):
        raise InputError(f"top_p must be a number in (0, 1] (1 or None: no top-p), got {top_p!r}")
    if seed is not None and not integer(seed):
        raise InputError(f"seed must be an integer or None, got {seed!r}")


def _bind(entry: Entry, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    names = [s.name for s in entry.slots if s.kind is SlotKind.USER]
    if len(args) > len(names):
        raise InputError(f"{entry.name} takes {len(names)} input(s) {names}, got {len(args)} positional")
    bound: dict[str, Any] = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise InputError(f"{entry.name} has no input named {k!r}; inputs: {names}")
        if k in bound:
            raise InputError(f"{entry.name}: input {k!r} given twice")
        bound[k] = v
    missing = [n for n in names if n not in bound]
    if missing:
        raise InputError(f"{entry.name}: missing input(s) {missing}; inputs: {names}")
    return [bound[n] for n in names]


def check_inputs(entry: Entry, inputs: list[Any]) -> None:
    """Raise InputError unless ``inputs`` match the entry's dtypes, ranks, static and dynamic dims."""
    names = [s.name for s in entry.slots if s.kind is SlotKind.USER]
    bound: dict[str, int] = {}
    for name, spec, x in zip(names, entry.user_inputs, inputs):
        expect = spec.describe()
        ranges = ", ".join(
            f"{d} in [{entry.dims[d].min}, {entry.dims[d].max}]" for d in spec.shape if isinstance(d, str)
        )
        hint = f"expected {expect}" + (f" with {ranges}" if ranges else "")
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{entry.name} input {name!r}: {hint}, got {type(x).__name__}")
        got = f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
        if x.layout != torch.strided or x.is_meta:
            raise InputError(f"{entry.name} input {name!r}: {hint}, got a {x.layout} tensor on {x.device}")
        if x.dtype != spec.torch_dtype:
            raise InputError(f"{entry.name} input {name!r}: {hint}, got dtype {got}")
        if x.dim() != len(spec.shape):
            raise InputError(f"{entry.name} input {name!r}: {hint}, got rank {x.dim()} ({got})")
        for axis, (want, have) in enumerate(zip(spec.shape, x.shape)):
            if isinstance(want, int):
                if want != have:
                    raise InputError(f"{entry.name} input {name!r}: {hint}, got {got} (dim {axis} must be {want})")
                continue
            rng = entry.dims.get(want)
            if rng is not None and not rng.min <= have <= rng.max:
                raise InputError(f"{entry.name} input {name!r}: {hint}, got {got} (dim {axis} out of range)")
            if bound.setdefault(want, have) != have:
                raise InputError(
                    f"{entry.name} input {name!r}: {hint}, got {got} (dim {axis} must equal {bound[want]} like the "
                    "other inputs)"
                )


def check_index_values(entry: str, bounds: Sequence[IndexBound], inputs: Sequence[torch.Tensor]) -> None:
    """Raise InputError unless the inputs the graph uses as indices lie within what they index.

    One min/max per bounded input (one scalar read for a selected element); ``inputs`` have
    passed :func:`check_inputs`. Runs before any kernel, so a refused call changes nothing.
    """
    extremes: dict[int, tuple[Any, Any]] = {}
    for b in bounds:
        x = inputs[b.position]
        if b.element:
            x = _element(entry, b, x)
            got = _extremes(x)
        elif b.position in extremes:
            got = extremes[b.position]
        else:
            got = extremes[b.position] = _extremes(x)
        if got is None:
            continue
        lo, hi = b.allowed(inputs)
        if not (lo <= got[0] and got[1] <= hi):  # NaN fails both comparisons
            raise InputError(_out_of_range(entry, b, x, lo, hi, inputs))


def _extremes(x: torch.Tensor) -> tuple[Any, Any] | None:
    n = x.numel()
    if n == 0:
        return None
    if n == 1:
        v = x.item()
        return v, v
    lo, hi = torch.aminmax(x)
    return lo.item(), hi.item()


def _element(entry: str, b: IndexBound, x: torch.Tensor) -> torch.Tensor:
    for dim, i in b.element:
        if x.dim() <= dim or not -x.shape[dim] <= i < x.shape[dim]:
            raise InputError(
                f"{entry} input {b.input!r}: the graph reads its element {i} along dim {dim}, which a tensor of "
                f"shape {list(x.shape)} does not have"
            )
        x = x.select(dim, i)
    return x


def _out_of_range(entry: str, b: IndexBound, x: torch.Tensor, lo: int, hi: int, inputs: Sequence[torch.Tensor]) -> str:
    flat = x.reshape(-1)
    bad = ((flat < lo) | (flat > hi) | (flat != flat)).nonzero().view(-1)
    shown = []
    for i in bad[:3].tolist():
        where = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), x.shape)) if x.dim() else ()
        shown.append(f"{flat[i].item()}" + (f" at {list(where)}" if where else ""))
    more = f" ({bad.numel()} values out of range)" if bad.numel() > len(shown) else ""
    span = ""
    if b.extent is not None:
        n = int(inputs[b.extent.position].shape[b.extent.axis])
        span = f" with {b.extent.input}.shape[{b.extent.axis}] = {n}"
    if b.table is SlotKind.CACHE:
        low = bool(bad.numel()) and flat[int(bad[0])].item() < lo
        what = "cache positions"
        hint = "positions count from 0" if low else "recompile with a larger max_cache_len for longer sequences"
    elif b.op == "embedding":
        what, hint = "token ids", "token ids must come from this model's own tokenizer"
    else:
        what, hint = "its values", "pass values within that range"
    return (
        f"{entry} input {b.describe()!r}: {what} must be in [{lo}, {hi}]{span}, because {b.why}; got "
        f"{', '.join(shown)}{more}. Nothing was run: {hint}"
    )
