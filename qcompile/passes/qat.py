"""qat: short quantization-aware fine-tuning with QuEST's trust estimator (arXiv 2502.05003).

What it does: every linear the plan quantizes with a QuEST weight spec (``weight.grid: quest``;
:func:`qcompile.plan.Plan.resolve`, the same selection and skips as ``quantize_weights``: the
lm_head stays out by default) is trained for ``steps`` optimizer steps on the calibration text
(``compile(..., calib=token ids)``, never evaluation text). The training forward runs the captured
``forward`` graph with autograd (an ``fx.Interpreter``); at each selected ``aten.linear`` it calls
:func:`qat_linear`, which fake-quantizes the weight per output row (per group for ``per_group``
specs) and the input per token with the plan's bits and QuEST's quantizer
(:func:`qcompile.quant.quest.quest_fake_quant`): the forward sees exactly the values the QuEST
integer linear computes with, the backward is the straight-through estimator masked by the trust
estimator, so the gradient flows only where ``|x̂ − x| ≤ T·σ`` and is zero for the clipped
entries. A layer whose activation spec is uniform (not QuEST) has its input fake-quantized with
that spec and a plain straight-through gradient. Everything else (norms, attention, the head) runs
in float and is not trained. ``qcompile::hadamard`` rotations (the ``hadamard`` pass, run before
this one) are differentiated through their plain-torch butterfly; any other qcompile op in the
graph is a PlanError (this pass runs on float graphs, before ``quantize_weights``).

Trust factor ``T`` (``trust``, in units of the block's RMS σ): by default (``null``) the half step
of the grid, ``α_b / (2^b − 1)`` (0.1676 at 4 bits, 0.2930 at 3), as in QuEST's reference code:
every entry inside the grid's range has an error of at most half a step and keeps its gradient,
only entries clipped beyond the outermost level lose it. A larger ``T`` lets mildly clipped values
keep theirs.

Loss (``loss``): ``distill`` (default), the mean per-token KL divergence from the float model's
next-token distribution (the teacher: this pass's input Program, run without gradients) to the
fake-quantized one's; ``ce``, next-token cross-entropy on the calibration text. Distillation is the
default because the fine-tuning is short and its data small (a few thousand calibration tokens): the
teacher gives a full distribution per token instead of one label, and it pulls the quantized model
back to the float one instead of fitting the calibration text.

Optimization: Adam (``lr``; betas 0.9, 0.999) on the selected linears' weights (and their biases,
with ``train_bias``), a 5 % linear warm-up then a cosine decay to zero over ``steps``, gradients
clipped to the global norm ``max_grad_norm``. Each step reads ``batch_size`` windows of ``seq_len``
tokens from the calibration sequences, drawn from a generator seeded with (``seed``, step): the data
order depends only on those two, so a resumed run reads what an uninterrupted one would.

Checkpoints (``checkpoint_dir``; ``null``: none): every ``checkpoint_every`` steps and at the end,
``<checkpoint_dir>/qat-checkpoint/`` is replaced atomically (:func:`qcompile.fileio.atomic_directory`)
by ``tensors.safetensors`` (the trained tensors and Adam's moments and step counts) and ``state.json``
(the step, the loss per step, the seconds spent, and a fingerprint: sha256 of the trained layers' plan
settings, of the options that shape training, of the starting weights of every state tensor the
``forward`` entry reads, and of the calibration tokens). A run that finds a checkpoint with the same
fingerprint resumes from its step and ends with the same weights as an uninterrupted run (tested
bit-identical on the same machine and thread count); a checkpoint with another fingerprint is refused
(ArtifactError naming what differs), and a ``qat-checkpoint`` folder that is not one is never
overwritten. One run writes a checkpoint folder at a time (a lock beside it).

Requires: float linears and the captured attention (it differentiates through the graph; run it
after ``hadamard`` and before ``quantize_weights``). Guarantees: the graphs are unchanged; the only
state tensors that change are the trained weights (and biases), written back in float with their
shapes and dtypes, read by every entry that shares them. A weight also read by something other than
a linear (a head tied to the embedding) is not trained, so the embedding does not change; it is
listed in ``skipped``. A non-finite loss is a NonFiniteError naming the step and the window.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.errors import ArtifactError, DataError, NonFiniteError, PlanError
from qcompile.ir.calib import calib_batches, entry_args
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import find_linears, non_linear_uses
from qcompile.ir.program import Program, SlotKind
from qcompile.passes.base import Pass, PassContext, PassResult, as_enum, register_pass
from qcompile.plan import Plan, to_plain
from qcompile.quant.quantizer import fake_quantize_activation
from qcompile.quant.quest import optimal_alpha, quest_fake_quant
from qcompile.quant.spec import Granularity, Grid, QuantSpec

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "qat-checkpoint"
CHECKPOINT_FORMAT = "qcompile-qat-checkpoint"
CHECKPOINT_VERSION = 1
WARMUP_FRACTION = 0.05
BETAS = (0.9, 0.999)


class Loss(str, enum.Enum):
    DISTILL = "distill"  # KL(float model ‖ fake-quantized model) per token
    CE = "ce"  # next-token cross-entropy on the calibration text


def default_trust(bits: int) -> float:
    """QuEST's default trust factor: the grid's half step in units of σ, ``α_b / (2^b − 1)``."""
    return optimal_alpha(bits) / (2**bits - 1)


def quest_trust_fake_quant(x: torch.Tensor, bits: int, trust: float) -> torch.Tensor:
    """QuEST fake quantization of ``x`` along its last axis with the trust-masked straight-through
    gradient (``|x̂ − x| ≤ trust·σ``): :func:`qcompile.quant.quest.quest_fake_quant` with ``dim=-1``."""
    return quest_fake_quant(x, bits, trust, -1)


def fake_quant(t: torch.Tensor, spec: QuantSpec, trust: float | None) -> torch.Tensor:
    """``t`` quantized-dequantized by ``spec`` along its last axis, differentiably: QuEST grids with the
    trust-masked straight-through gradient (blocks: the whole row, or ``group_size`` channels),
    uniform grids (activations) with the plain straight-through gradient."""
    if spec.grid is not Grid.QUEST:
        return t + (fake_quantize_activation(t.detach(), spec) - t).detach()
    bound = default_trust(spec.bits) if trust is None else trust
    k = t.shape[-1]
    if spec.granularity is Granularity.PER_GROUP:
        g = int(spec.group_size or k)
        return quest_trust_fake_quant(t.reshape(*t.shape[:-1], k // g, g), spec.bits, bound).reshape(t.shape)
    return quest_trust_fake_quant(t, spec.bits, bound)


def qat_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    weight: QuantSpec,
    activation: QuantSpec | None,
    trust: float | None = None,
) -> torch.Tensor:
    """The training linear: ``fq(x) · fq(W)ᵀ + b`` with QuEST fake quantization of the weight (per
    output row or group) and of the input (per token or group; float when ``activation`` is None)."""
    xq = x if activation is None else fake_quant(x, activation, trust)
    return torch.nn.functional.linear(xq, fake_quant(w, weight, trust), bias)


def _differentiable_standins() -> dict[object, Callable[..., torch.Tensor]]:
    """qcompile ops this pass differentiates through, with the plain-torch function that computes them."""
    out: dict[object, Callable[..., torch.Tensor]] = {}
    try:
        op = torch.ops.qcompile.hadamard.default  # the hadamard pass's online rotation
        from qcompile.quant.hadamard import fwht
    except (AttributeError, ImportError, RuntimeError):
        return out
    out[op] = lambda x, blocks: fwht(x, list(blocks))
    return out


@dataclass
class _Layer:
    path: str
    node: fx.Node
    weight_key: str
    bias_key: str | None
    weight: QuantSpec
    activation: QuantSpec | None


class _Student(fx.Interpreter):
    """The forward entry with the selected linears as :func:`qat_linear` (autograd on)."""

    def __init__(self, gm: fx.GraphModule, layers: dict[fx.Node, _Layer], trust: float | None) -> None:
        super().__init__(gm)
        self.layers, self.trust = layers, trust
        self.standins = _differentiable_standins()

    def run_node(self, n: fx.Node) -> Any:
        layer = self.layers.get(n)
        if layer is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return qat_linear(args[0], args[1], bias, layer.weight, layer.activation, self.trust)
        fn = self.standins.get(n.target) if n.op == "call_function" else None
        if fn is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return fn(*args, **kwargs)
        return super().run_node(n)


def _logits(outs: Any, vocab: Any) -> torch.Tensor:
    flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    for t in flat:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3:
            if vocab is None or t.shape[-1] == int(vocab):
                return t
    raise PlanError("qat needs a causal LM whose forward entry returns logits [B, T, vocab]")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"qat:{seed}:{step}".encode()).digest()[:7], "little")


@register_pass
@dataclass(frozen=True)
class QAT(Pass):
    name: ClassVar[str] = "qat"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS, Fact.KV_ATTENTION})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.QAT_TRAINED})

    steps: int = 200
    lr: float = 1e-5
    seq_len: int = 128
    batch_size: int = 1
    trust: float | None = None  # in units of σ; None: α_b / (2^b − 1), the grid's half step
    loss: Loss = Loss.DISTILL
    train_bias: bool = True
    max_grad_norm: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    seed: int = 0
    entry: str = "forward"

    def __post_init__(self) -> None:
        as_enum(self, "loss", Loss)
        for name, low in (("steps", 0), ("seq_len", 2), ("batch_size", 1), ("checkpoint_every", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise PlanError(f"qat: {name} must be an integer >= {low}, got {v!r}")
        for name in ("lr", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise PlanError(f"qat: {name} must be a finite number > 0, got {v!r}")
        t = self.trust
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise PlanError(
                f"qat: trust must be a finite number > 0 (in units of the block's RMS; null for the grid's half "
                f"step), got {t!r}"
            )
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise PlanError(f"qat: checkpoint_dir must be a folder path or null, got {self.checkpoint_dir!r}")

    # ---- the pass ---------------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        if self.entry not in program.entries:
            raise PlanError(f"qat: the program has no entry {self.entry!r}; entries: {list(program.entries)}")
        layers, skipped = self._layers(program, ctx.plan)
        if not layers:
            return PassResult(program, modified=False, skipped=skipped, notes={"reason": "no QuEST linear to train"})
        self._check_ops(program)
        rows = self._rows(program, ctx)
        keys = self._trained_keys(layers)
        trainer = _Trainer(program, self, layers, keys)
        fingerprint = self._fingerprint(program, layers, rows)
        ckpt = Path(self.checkpoint_dir) / CHECKPOINT_NAME if self.checkpoint_dir is not None else None
        if ckpt is None:
            state = trainer.train(rows, fingerprint, None, ctx.progress)
        else:
            from qcompile.fileio import output_lock

            with output_lock(ckpt):
                state = trainer.train(rows, fingerprint, ckpt, ctx.progress)
        for key, p in trainer.params.items():
            program.state[key] = p.detach().clone().to(program.state[key].dtype)
        losses = state["losses"]
        seconds = time.perf_counter() - t0
        notes: dict[str, Any] = {
            "steps": self.steps,
            "resumed_from": state["resumed_from"],
            "loss": self.loss.value,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "losses": [round(v, 6) for v in losses],
            "tokens_per_step": self.batch_size * self.seq_len,
            "calibration_tokens": int(sum(r.numel() for r in rows)),
            "layers": len({ly.path for ly in layers}),
            "parameters": int(sum(p.numel() for p in trainer.params.values())),
            "train_seconds": round(state["seconds"], 2),
            "seconds": round(seconds, 2),
            "checkpoint": None if ckpt is None else str(ckpt),
        }
        log.info("qat: %d steps, loss %s -> %s in %.1fs", self.steps, notes["loss_first"], notes["loss_last"], seconds)
        return PassResult(
            program,
            modified=self.steps > 0,
            layers_changed=sorted({ly.path for ly in layers}),
            skipped=skipped,
            notes=notes,
        )

    @classmethod
    def summarize(cls, notes: dict[str, Any]) -> list[str]:
        if "steps" not in notes:
            return []
        resumed = f", resumed from step {notes['resumed_from']}" if notes.get("resumed_from") else ""
        first, last = notes.get("loss_first"), notes.get("loss_last")
        loss = f"{notes['loss']} loss {first:.4g} → {last:.4g}" if first is not None else "no step run"
        return [
            f"QAT: {notes['steps']} steps × {notes['tokens_per_step']} tokens on {notes['layers']} linears "
            f"({notes['parameters']:,} parameters), {loss}, {notes['train_seconds'] / 60:.1f} min{resumed}"
        ]

    def _layers(self, program: Program, plan: Plan) -> tuple[list[_Layer], list[tuple[str, str]]]:
        from qcompile.passes.quantize_weights import QuantizeWeights

        layers: list[_Layer] = []
        skipped: dict[str, str] = {}
        for m in find_linears(program):
            if m.entry.name != self.entry:
                continue
            lq = plan.resolve(m.path)
            reason = QuantizeWeights._skip_reason(lq)
            if not reason and lq.weight is not None and lq.weight.grid is not Grid.QUEST:
                reason = "weights are not on the QuEST grid (qat trains layers with weight grid: quest)"
            if not reason and (tied := non_linear_uses(program, m.weight_key)):
                reason = f"weight tied to {', '.join(tied)}; training it would change those too"
            if reason:
                skipped.setdefault(m.path, reason)
                continue
            assert lq.weight is not None
            k = program.state[m.weight_key].shape[1]
            for what, spec in (("weight", lq.weight), ("activation", lq.activation)):
                if spec is None:
                    continue
                groups = spec.grid is Grid.QUEST and spec.granularity is Granularity.PER_GROUP
                if spec.granularity is Granularity.PER_TENSOR or (groups and k % int(spec.group_size or k)):
                    raise PlanError(
                        f"qat: layer {m.path!r}: {what} {spec} is not supported (QuEST blocks are whole rows or "
                        f"groups dividing the {k} input channels; activations per token or per group)"
                    )
            layers.append(_Layer(m.path, m.node, m.weight_key, m.bias_key, lq.weight, lq.activation))
        return layers, sorted(skipped.items())

    def _check_ops(self, program: Program) -> None:
        standins = _differentiable_standins()
        for n in program.entries[self.entry].graph.graph.nodes:
            target = n.target
            if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
                continue
            if target.namespace == "qcompile" and target not in standins:
                raise PlanError(
                    f"qat differentiates through the {self.entry!r} entry, but node %{n.name} "
                    f"({n.meta.get('qcompile_path', '')!r}) is {target}, which has no gradient; run qat on float "
                    "linears (after hadamard, before quantize_weights and the passes that add qcompile ops)"
                )

    def _rows(self, program: Program, ctx: PassContext) -> list[torch.Tensor]:
        batches = calib_batches(ctx.calib, who="qat (fine-tuning)", program=program, min_tokens=self.seq_len)
        rows = [row for b in batches for row in b]
        if not any(r.numel() >= self.seq_len for r in rows):
            raise DataError(
                f"qat: no calibration sequence holds seq_len={self.seq_len} tokens (the longest has "
                f"{max(r.numel() for r in rows)}); lower seq_len or pass longer calibration sequences"
            )
        return rows

    def _trained_keys(self, layers: list[_Layer]) -> list[str]:
        keys: list[str] = []
        for ly in layers:
            for k in (ly.weight_key, ly.bias_key if self.train_bias else None):
                if k is not None and k not in keys:
                    keys.append(k)
        return keys

    def _fingerprint(self, program: Program, layers: list[_Layer], rows: list[torch.Tensor]) -> dict[str, str]:
        """sha256 of what determines the training (see the module docstring)."""
        options = {
            f.name: to_plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("checkpoint_dir", "checkpoint_every")
        }
        settings = [
            [ly.path, ly.weight_key, to_plain(ly.weight), None if ly.activation is None else to_plain(ly.activation)]
            for ly in layers
        ]
        h = hashlib.sha256()
        entry = program.entries[self.entry]
        for key in sorted({s.name for s in entry.slots if s.kind is SlotKind.STATE}):
            t = program.state[key].detach().contiguous()
            h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        d = hashlib.sha256()
        for r in rows:
            d.update(f"{r.numel()};".encode())
            d.update(r.contiguous().numpy().tobytes())
        return {
            "layers": _sha(settings),
            "options": _sha(options),
            "weights": h.hexdigest(),
            "data": d.hexdigest(),
        }


# ---- training ------------------------------------------------------------------------------------
_WHAT = {
    "layers": "the plan's settings of the trained layers",
    "options": "the qat options",
    "weights": "the starting weights (another model, or other passes before qat)",
    "data": "the calibration tokens",
}


class _Trainer:
    """Holds the trained tensors, the optimizer and the teacher; runs steps and checkpoints."""

    def __init__(self, program: Program, opts: QAT, layers: list[_Layer], keys: list[str]) -> None:
        self.program, self.opts, self.keys = program, opts, keys
        self.entry = program.entries[opts.entry]
        self.params = {k: program.state[k].detach().clone().to(torch.float32).requires_grad_(True) for k in keys}
        self.layers = {ly.node: ly for ly in layers}
        self.vocab = program.meta.get("vocab_size")
        self.optimizer = (
            torch.optim.Adam(list(self.params.values()), lr=opts.lr, betas=BETAS, fused=True) if keys else None
        )

    # the inputs of the forward entry, trained tensors in place of their state
    def _args(self, ids: torch.Tensor, trained: bool) -> list[torch.Tensor]:
        args = entry_args(self.program, self.opts.entry, [ids])
        if not trained:
            return args
        out = []
        for slot, a in zip(self.entry.slots, args):
            out.append(self.params[slot.name] if slot.kind is SlotKind.STATE and slot.name in self.params else a)
        return out

    def student_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return _logits(_Student(self.entry.graph, self.layers, self.opts.trust).run(*self._args(ids, True)), self.vocab)

    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _logits(self.entry.graph(*self._args(ids, False)), self.vocab)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The training loss of the token window ``ids`` [1, T] (autograd on the trained tensors)."""
        logits = self.student_logits(ids).to(torch.float32)
        if self.opts.loss is Loss.CE:
            return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        ref = torch.log_softmax(self.teacher_logits(ids).to(torch.float32), -1)
        out = torch.log_softmax(logits, -1)
        return (ref.exp() * (ref - out)).sum(-1).mean()

    def windows(self, rows: list[torch.Tensor], step: int) -> list[tuple[int, int]]:
        """(row, offset) of the ``batch_size`` windows of ``step``: from (seed, step) only."""
        n = self.opts.seq_len
        counts = [max(0, r.numel() - n + 1) for r in rows]
        total = sum(counts)
        g = torch.Generator().manual_seed(_step_seed(self.opts.seed, step))
        out = []
        for i in torch.randint(0, total, (self.opts.batch_size,), generator=g).tolist():
            r = 0
            while i >= counts[r]:
                i -= counts[r]
                r += 1
            out.append((r, i))
        return out

    def lr_at(self, step: int) -> float:
        warm = max(1, math.ceil(WARMUP_FRACTION * self.opts.steps))
        if step < warm:
            return self.opts.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.opts.steps - warm)
        return self.opts.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def train(
        self, rows: list[torch.Tensor], fingerprint: dict[str, str], ckpt: Path | None, progress: bool
    ) -> dict[str, Any]:
        from tqdm.auto import tqdm

        assert self.optimizer is not None
        start, losses, seconds = 0, [], 0.0
        if ckpt is not None:
            restored = self._load(ckpt, fingerprint)
            if restored is not None:
                start, losses, seconds = restored
        resumed_from = start if start else None
        params = list(self.params.values())
        bar = tqdm(total=self.opts.steps, initial=start, desc="qat", disable=not progress, unit="step")
        t0 = time.perf_counter()
        for step in range(start, self.opts.steps):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            with torch.enable_grad():
                for r, off in self.windows(rows, step):
                    ids = rows[r][off : off + self.opts.seq_len][None]
                    loss = self.loss(ids)
                    if not torch.isfinite(loss):
                        raise NonFiniteError(
                            f"qat: the training loss is {float(loss)} at step {step} (calibration sequence {r}, "
                            f"tokens {off}..{off + self.opts.seq_len - 1}); lower lr or check the model's weights"
                        )
                    (loss / self.opts.batch_size).backward()
                    total += float(loss.detach()) / self.opts.batch_size
            torch.nn.utils.clip_grad_norm_(params, self.opts.max_grad_norm)
            self.optimizer.step()
            losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            if ckpt is not None and (done % self.opts.checkpoint_every == 0 or done == self.opts.steps):
                self._save(ckpt, fingerprint, done, losses, seconds + time.perf_counter() - t0)
        bar.close()
        return {"losses": losses, "resumed_from": resumed_from, "seconds": seconds + time.perf_counter() - t0}

    # ---- checkpoints ----------------------------------------------------------------------------
    def _save(self, ckpt: Path, fingerprint: dict[str, str], step: int, losses: list[float], seconds: float) -> None:
        from safetensors.torch import save_file

        from qcompile.fileio import atomic_directory

        self._check_ours(ckpt)
        assert self.optimizer is not None
        tensors: dict[str, torch.Tensor] = {}
        for key in self.keys:
            tensors[f"param/{key}"] = self.params[key].detach().clone().contiguous()
            st = self.optimizer.state.get(self.params[key], {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in st:
                    tensors[f"{name}/{key}"] = st[name].detach().clone().contiguous()
            if "step" in st:
                tensors[f"step/{key}"] = st["step"].detach().reshape(1).to(torch.float32).clone()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "steps": self.opts.steps,
            "fingerprint": fingerprint,
            "losses": losses,
            "seconds": seconds,
            "keys": self.keys,
        }
        with atomic_directory(ckpt) as tmp:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))

    @staticmethod
    def _meta(ckpt: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((ckpt / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT else None

    def _check_ours(self, ckpt: Path) -> None:
        if ckpt.exists() and self._meta(ckpt) is None:
            raise ArtifactError(
                f"qat: {ckpt} exists and is not a qat checkpoint (no state.json of format {CHECKPOINT_FORMAT!r}); "
                "it is left alone: choose another checkpoint_dir"
            )

    def _load(self, ckpt: Path, fingerprint: dict[str, str]) -> tuple[int, list[float], float] | None:
        from safetensors.torch import load_file

        if not ckpt.exists():
            return None
        self._check_ours(ckpt)
        meta = self._meta(ckpt)
        assert meta is not None
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ArtifactError(
                f"qat: checkpoint {ckpt} has version {meta.get('version')}, expected {CHECKPOINT_VERSION}"
            )
        theirs = meta.get("fingerprint") or {}
        differ = [k for k in fingerprint if theirs.get(k) != fingerprint[k]]
        if differ:
            raise ArtifactError(
                f"qat: checkpoint {ckpt} was written for a different run: "
                + "; ".join(f"{_WHAT[k]} differ" for k in differ)
                + ". It is not applied; use another checkpoint_dir (or delete that folder if it is stale)"
            )
        tensors = load_file(str(ckpt / "tensors.safetensors"))
        if meta.get("keys") != self.keys or any(f"param/{k}" not in tensors for k in self.keys):
            raise ArtifactError(f"qat: checkpoint {ckpt} does not hold the trained tensors {self.keys[:3]}...")
        assert self.optimizer is not None
        sd = self.optimizer.state_dict()
        with torch.no_grad():
            for i, key in enumerate(self.keys):
                p = self.params[key]
                src = tensors[f"param/{key}"]
                if src.shape != p.shape:
                    raise ArtifactError(
                        f"qat: checkpoint {ckpt}: {key} has shape {list(src.shape)}, not {list(p.shape)}"
                    )
                p.copy_(src)
                if f"step/{key}" in tensors:
                    sd["state"][i] = {
                        "step": tensors[f"step/{key}"].reshape(()),
                        "exp_avg": tensors[f"exp_avg/{key}"],
                        "exp_avg_sq": tensors[f"exp_avg_sq/{key}"],
                    }
        self.optimizer.load_state_dict(sd)
        step = int(meta["step"])
        log.info("qat: resuming from step %d of %s", step, ckpt)
        return step, [float(v) for v in meta.get("losses", [])], float(meta.get("seconds", 0.0))


def fake_quant_loss(
    program: Program, plan: Plan, rows: list[torch.Tensor], opts: QAT, teacher: Program | None = None
) -> float:
    """The mean training loss of ``program`` (fake-quantized as ``plan`` says) over the token windows
    ``rows`` ([1, T] each), without gradients; for ``distill`` the teacher is ``teacher`` (default:
    ``program`` itself in float)."""
    layers, _ = opts._layers(program, plan)
    tr = _Trainer(program, opts, layers, opts._trained_keys(layers))
    if teacher is not None:
        ref = _Trainer(teacher, opts, [], [])
        tr.teacher_logits = ref.teacher_logits  # type: ignore[method-assign]
    with torch.no_grad():
        return float(sum(float(tr.loss(r)) for r in rows) / len(rows))


__all__ = ["QAT", "Loss", "default_trust", "fake_quant", "fake_quant_loss", "qat_linear", "quest_trust_fake_quant"]
