"""Perplexity over fixed, non-overlapping windows of one token stream.

Window ``i`` is ``tokens[i*seq : (i+1)*seq]``; the model sees exactly that window (no BOS is
prepended, no context carried over) and is scored on predicting tokens 1..seq-1 of it, so each
window contributes ``seq - 1`` predictions. NLL is accumulated in float64 and
``ppl = exp(total_nll / predictions)``. Every plan is run on the same windows, so numbers compare.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.errors import DataError

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    predictions: int  # number of predicted tokens
    tokens: int  # tokens consumed (windows * seq)
    windows: int
    seq: int
    seconds: float


def windows_of(tokens: torch.Tensor, seq: int, windows: int | None) -> torch.Tensor:
    """``[windows, seq]`` non-overlapping windows from the start of ``tokens``."""
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


def perplexity(
    logits_fn: Logits, tokens: torch.Tensor, seq: int = 512, windows: int | None = None, progress: bool = False
) -> PerplexityResult:
    """Perplexity of ``logits_fn`` (``[1, seq] int64 -> [1, seq, vocab]``) on ``tokens``."""
    from tqdm import tqdm

    wins = windows_of(tokens, seq, windows)
    total = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in tqdm(wins, desc="perplexity", unit="window", disable=not progress):
            logits = logits_fn(w.view(1, seq))
            if logits.shape[:2] != (1, seq):
                raise DataError(f"model returned logits of shape {tuple(logits.shape)} for a [1, {seq}] window")
            logp = torch.log_softmax(logits[0, :-1].to(torch.float64), dim=-1)
            total += float(-logp.gather(1, w[1:].view(-1, 1)).sum())
    n = wins.shape[0] * (seq - 1)
    nll = total / n
    return PerplexityResult(math.exp(nll), nll, n, wins.numel(), wins.shape[0], seq, time.perf_counter() - t0)


def hf_logits(model: torch.nn.Module) -> Logits:
    """Logits function of an unmodified Hugging Face causal LM (the reference)."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return run
