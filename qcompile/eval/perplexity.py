"""Perplexity over fixed, non-overlapping windows of one token stream, with or without BOS.

The text is tokenized once, without special tokens. Window ``i`` is the ``seq`` text tokens
``w = tokens[i*seq : (i+1)*seq]`` (no context carried over from the window before).

* **Without BOS** the model sees exactly ``w`` (``seq`` positions).
* **With BOS** (``bos_id`` given) the model sees ``[bos_id] + w`` (``seq + 1`` positions); the BOS
  position is context only, never scored, and ``w[0]`` (which follows BOS) is not scored either.

Either way the scored tokens are ``w[1:]``, each predicted from everything before it in the
window, so a window contributes ``seq - 1`` predictions and the numbers with and without BOS
score the very same tokens. NLL is accumulated in float64 and ``ppl = exp(total_nll /
predictions)``. Every plan is run on the same windows, so numbers compare.

Whether to prefix BOS follows the tokenizer's own rule (:func:`tokenizer_bos`: does encoding a
text with special tokens start with the BOS id?) unless the caller overrides it
(:func:`resolve_bos`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.errors import DataError

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    predictions: int  # number of predicted tokens
    tokens: int  # text tokens consumed (windows * seq; a BOS prefix is not counted)
    windows: int
    seq: int
    seconds: float
    bos_id: int | None = None  # the id prefixed to every window, None without BOS


@dataclass(frozen=True)
class BosChoice:
    """Whether windows get a BOS prefix, and why: ``source`` is "tokenizer" (its own rule) or "flag"."""

    used: bool
    source: str
    token_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"used": self.used, "source": self.source, "token_id": self.token_id}

    @property
    def prefix(self) -> int | None:
        return self.token_id if self.used else None


def windows_of(tokens: torch.Tensor, seq: int, windows: int | None) -> torch.Tensor:
    """``[windows, seq]`` non-overlapping windows of text tokens from the start of ``tokens``."""
    if seq < 2:
        raise DataError(f"--seq must be at least 2, got {seq}")
    available = int(tokens.numel()) // seq
    if windows is None:
        windows = available
    if windows < 1:
        raise DataError(f"--windows must be at least 1, got {windows}")
    if windows > available:
        raise DataError(
            f"the text has {tokens.numel()} tokens, too few for {windows} windows of {seq} "
            f"(needs {windows * seq}); at most {available} window(s) fit — use fewer --windows, a shorter --seq or a "
            "longer text"
        )
    return tokens[: windows * seq].view(windows, seq)


def model_inputs(wins: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """What the model sees for ``[windows, seq]`` text windows: themselves, or ``[windows, seq + 1]``
    with ``bos_id`` in front of each."""
    if bos_id is None:
        return wins
    return torch.cat([torch.full((wins.shape[0], 1), int(bos_id), dtype=wins.dtype), wins], dim=1)


def window_nll(logits: torch.Tensor, window: torch.Tensor, bos: bool) -> float:
    """Summed NLL (float64) of ``window[1:]`` given ``[1, len, vocab]`` logits of the model input
    (the window, or BOS + window): the same ``seq - 1`` tokens either way."""
    seq = int(window.numel())
    off = 1 if bos else 0
    logp = torch.log_softmax(logits[0, off : off + seq - 1].to(torch.float64), dim=-1)
    return float(-logp.gather(1, window[1:].view(-1, 1)).sum())


def perplexity(
    logits_fn: Logits,
    tokens: torch.Tensor,
    seq: int = 512,
    windows: int | None = None,
    progress: bool = False,
    bos_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``logits_fn`` (``[1, n] int64 -> [1, n, vocab]``) on ``tokens``; ``bos_id``
    prefixes every window with that id (see the module docstring)."""
    from tqdm import tqdm

    wins = windows_of(tokens, seq, windows)
    inputs = model_inputs(wins, bos_id)
    n_in = inputs.shape[1]
    total = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for w, x in tqdm(zip(wins, inputs), total=len(wins), desc="perplexity", unit="window", disable=not progress):
            logits = logits_fn(x.view(1, n_in))
            if logits.shape[:2] != (1, n_in):
                raise DataError(f"model returned logits of shape {tuple(logits.shape)} for a [1, {n_in}] window")
            total += window_nll(logits, w, bos_id is not None)
    n = wins.shape[0] * (seq - 1)
    nll = total / n
    return PerplexityResult(math.exp(nll), nll, n, wins.numel(), wins.shape[0], seq, time.perf_counter() - t0, bos_id)


def tokenizer_bos(tokenizer: Any) -> BosChoice:
    """The tokenizer's own rule: BOS is used when it has a BOS id and encoding a text with special
    tokens puts that id first (this follows ``add_bos_token``, GGUF's ``tokenizer.ggml.add_bos_token``
    and template post-processors alike). No BOS id: no BOS."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos_id, int):
        return BosChoice(False, "tokenizer", None)
    probe = "The"
    with_special = list(tokenizer(probe, add_special_tokens=True).input_ids)
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    used = with_special[:1] == [bos_id] and plain[:1] != [bos_id]
    return BosChoice(used, "tokenizer", bos_id)


def resolve_bos(tokenizer: Any, bos: bool | None, model: str = "the model") -> BosChoice:
    """``bos`` None: the tokenizer's rule; True/False: the caller's choice ("flag"). Asking for BOS
    from a tokenizer without a BOS id is a DataError."""
    rule = tokenizer_bos(tokenizer)
    if bos is None:
        return rule
    if bos and rule.token_id is None:
        raise DataError(
            f"--bos was asked for, but {model}'s tokenizer has no BOS token (bos_token_id is None); drop --bos "
            "or use --no-bos"
        )
    return BosChoice(bool(bos), "flag", rule.token_id)


def hf_logits(model: torch.nn.Module) -> Logits:
    """Logits function of an unmodified Hugging Face causal LM (the reference)."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return run
