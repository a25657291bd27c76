"""The decoder-family matrix: tiny random-weight models of every family transformers ships that fits a
causal-LM export, run through every preset family on both backends.

Each family is built from transformers' own config class (hidden 64, 2 layers, 4 query heads, seeded)
with the features that make it differ: Qwen2's q/k/v biases, Qwen3's and OLMo 2's q/k norms, Gemma's
``(1 + w)`` norms, scaled embeddings, soft-capping and sliding windows, Mistral's sliding window,
Phi-3's fused ``qkv_proj`` / ``gate_up_proj``, GPT-2's Conv1D layers, LayerNorm and learned positions,
GPT-NeoX's fused interleaved ``query_key_value`` and partial rotary. Norm weights are perturbed away
from their initial value so that ``w`` and ``1 + w`` norms cannot be confused.

A cell (family × plan × backend) is one of:

* ``ok``: fp32 matches transformers within 1e-4 (TVM: the torch reference backend within 1e-3); a
  quantized plan runs, every pass did its work, its output is finite, and on TVM it matches the
  reference backend of the same plan (the integer parts are exact, accumulation order differs: every
  position within 1e-3 except at most one in ten where an activation code rounded the other way,
  :func:`_disagreement`); prefill + decode equals forward in the same sense.
* ``reported``: a pass said what it could not match and why — a PassError naming the structure it
  needed, or layers listed as skipped in the report (shown in ``detail``) while the rest of the plan ran.
* ``failed``: anything else (a traceback from inside a pass, a silent no-op, a mismatch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qcompile.errors import PassError, PlanError
from qcompile.eval.composition import decoded_logits

PLANS = ("fp32", "w8a8-rtn", "w8a8-smooth", "w6a8-flexq", "w4a16-rtn-g128", "w4a4-mergequant", "xcache-4bit")
BACKENDS = ("torch", "tvm")
VOCAB = 256
SEQ = 20
PROMPT = 12  # prefill length: past Gemma's and Mistral's 8-token sliding window
FP32_TOL = 1e-4
BACKEND_TOL = 1e-3
FLIP_TOL = 5e-2  # one activation code rounded the other way (see _disagreement)

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": None,
    "pad_token_id": 0,
}


def _hf(config: str, model: str, **extra: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        cfg = getattr(transformers, config)(**{**_COMMON, **extra})
        return getattr(transformers, model)(cfg)

    return build


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=None
    )
    return GPT2LMHeadModel(cfg)


FAMILIES: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "llama": ("Llama: RMSNorm, RoPE, GQA", _hf("LlamaConfig", "LlamaForCausalLM")),
    "qwen2": ("Qwen2: q/k/v biases", _hf("Qwen2Config", "Qwen2ForCausalLM")),
    "qwen3": ("Qwen3: per-head q/k norms", _hf("Qwen3Config", "Qwen3ForCausalLM", head_dim=16)),
    "gemma2": (
        "Gemma 2: (1 + w) norms, scaled embedding, attention and final soft-capping, sliding window",
        _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, sliding_window=8),
    ),
    "gemma3": (
        "Gemma 3: (1 + w) norms, q/k norms, scaled embedding, sliding window",
        _hf("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=8),
    ),
    "mistral": ("Mistral: sliding window", _hf("MistralConfig", "MistralForCausalLM", sliding_window=8)),
    "phi3": ("Phi-3: fused qkv_proj and gate_up_proj", _hf("Phi3Config", "Phi3ForCausalLM")),
    "gpt2": ("GPT-2: Conv1D, fused c_attn, LayerNorm, learned positions", _gpt2),
    "gptneox": (
        "GPT-NeoX: fused interleaved query_key_value, LayerNorm, partial rotary",
        _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", num_key_value_heads=4, rotary_pct=0.5),
    ),
    "olmo2": ("OLMo 2: post-norms, q/k norms over the whole projection", _hf("Olmo2Config", "Olmo2ForCausalLM")),
}


def tiny_family(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny random model of family ``name`` (norm weights perturbed: ``w`` ≠ ``1 + w`` matters)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; families: {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    model = FAMILIES[name][1]().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or ".ln_" in pname:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@dataclass
class FamilySubject:
    """One family: the model, its captured Program, inputs, calibration ids and transformers' logits."""

    name: str
    model: torch.nn.Module
    program: Any
    ids: torch.Tensor
    calib: torch.Tensor
    reference: torch.Tensor
    refs: dict[str, torch.Tensor] = field(default_factory=dict)  # plan -> torch-backend logits


def family_subject(name: str) -> FamilySubject:
    import qcompile

    model = tiny_family(name)
    ids = torch.randint(2, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(2, VOCAB, (8, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
    return FamilySubject(name, model, qcompile.capture(model, max_cache_len=64), ids, calib, reference)


@dataclass(frozen=True)
class FamilyCell:
    family: str
    plan: str
    backend: str
    outcome: str  # "ok", "reported" or "failed"
    detail: str = ""
    error: float | None = None  # vs transformers' fp32 logits

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _mismatch(a: torch.Tensor, b: torch.Tensor, exact: bool) -> str | None:
    if not exact:
        return _disagreement(a, b)
    return f"{_rel(a, b):.2g}" if _rel(a, b) > BACKEND_TOL else None


def _disagreement(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why two runs of one quantized plan disagree, or None. Two computations of the same integer parts
    agree to float rounding at every position, except where a 1-ulp difference upstream rounds an
    activation code the other way: that moves one position's logits by about one quantization step.
    Allowed: at most one position in ten beyond BACKEND_TOL, none beyond FLIP_TOL."""
    per_pos = ((a - b).abs().amax(-1) / b.abs().max().clamp_min(1e-30)).flatten()
    off = int((per_pos > BACKEND_TOL).sum())
    if off * 10 > per_pos.numel() or float(per_pos.max()) > FLIP_TOL:
        return f"{off}/{per_pos.numel()} positions differ by more than {BACKEND_TOL:g} (max {float(per_pos.max()):.2g})"
    return None


def _reported_layers(cm: Any) -> list[str]:
    """Layers a pass listed as not handled, other than the ones the plan itself keeps in float."""
    out = []
    for pr in cm.report.passes:
        for path, why in pr.skipped:
            if not cm.plan.resolve(path).skip:
                out.append(f"{pr.name}: {path}: {why}")
    return out


def run_family_cell(s: FamilySubject, plan: str, backend: str) -> FamilyCell:
    """Compile ``plan`` for family ``s`` on ``backend`` and classify the outcome (see the module doc)."""
    import qcompile

    def cell(outcome: str, detail: str = "", error: float | None = None) -> FamilyCell:
        return FamilyCell(s.name, plan, backend, outcome, detail, error)

    try:
        cm = qcompile.compile(s.program.copy(), plan=plan, calib=s.calib, backend=backend)
        with torch.no_grad():
            out = cm(s.ids).detach()
            decoded = decoded_logits(cm, s.ids, PROMPT)
    except (PassError, PlanError) as e:
        return cell("reported", " ".join(str(e).split())[:400])
    except Exception as e:  # a crash is the failure this matrix exists to find
        return cell("failed", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}")
    lazy = [p.name for p in cm.report.passes if not p.modified and p.name != "assign_precision"]
    if lazy:
        return cell("failed", f"silent no-op: {lazy} changed nothing")
    if not torch.isfinite(out).all():
        return cell("failed", "non-finite output")
    err = _rel(out, s.reference)
    exact = plan == "fp32"  # float only: no code can round the other way
    if why := _mismatch(decoded, out[:, PROMPT - 1 :], exact):
        return cell("failed", f"prefill+decode differs from forward: {why}", err)
    if exact and backend == "torch" and err > FP32_TOL:
        return cell("failed", f"fp32 differs from transformers by {err:.2g}", err)
    if backend == "torch":
        s.refs[plan] = out
    elif plan in s.refs and (why := _mismatch(out, s.refs[plan], exact)):
        return cell("failed", f"differs from the reference backend: {why}", err)
    reported = _reported_layers(cm)
    if reported:
        return cell("reported", f"{len(reported)} layers: " + "; ".join(reported[:3]), err)
    return cell("ok", "", err)


def run_family(name: str, plans: tuple[str, ...] = PLANS, backends: tuple[str, ...] = BACKENDS) -> list[FamilyCell]:
    """Every cell of one family (the torch backend first: it is the other backend's reference)."""
    s = family_subject(name)
    order = [b for b in ("torch", *backends) if b in backends]
    return [run_family_cell(s, p, b) for b in dict.fromkeys(order) for p in plans]
