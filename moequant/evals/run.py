"""One evaluation from names to report: text, tokens, windows, scoring.

Protocol: the whole evaluation text (the held-out split of a named dataset, or a text file) is
tokenised once, without special tokens, with the model's tokenizer; it is cut into consecutive
non-overlapping windows of ``seqlen`` tokens (the remainder is dropped; ``max_windows`` keeps the
first ones); each window is scored on its own; perplexity = exp(mean NLL of every predicted token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moequant.arch.registry import adapter_for
from moequant.calib import consecutive_windows, load_text, load_tokenizer, tokenize
from moequant.checkpoint.reader import CheckpointReader, resolve_source
from moequant.device import resolve_device
from moequant.errors import MoequantError
from moequant.evals.report import build_report
from moequant.evals.streamed import check_batch, check_engine, evaluate_windows
from moequant.numeric import check_int
from moequant.progress import Progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EvalSettings:
    """How an evaluation runs: window length, how many windows, chunking, engine and compute dtype."""

    seqlen: int = 2048
    max_windows: int | None = None
    batch: int = 0
    engine: str = "streamed"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_int(self.seqlen, "--seqlen", 2, meaning="tokens per window; a window predicts seqlen - 1 tokens")
        if self.max_windows is not None:
            check_int(self.max_windows, "--max-windows", 1)
        check_batch(self.batch)
        check_engine(self.engine)
        if self.dtype not in DTYPES:
            raise MoequantError(f"unknown dtype {self.dtype!r}; use {', '.join(DTYPES)}")


def dataset_label(dataset: str) -> str:
    """How a dataset is named in reports: a file by its absolute path, anything else as given."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.is_file() else dataset


def evaluation_windows(dataset: str, tokenizer_dirs: list[Path], seqlen: int,
                       max_windows: int | None = None, progress: Progress | None = None) -> torch.Tensor:
    """The evaluation windows ``[W, seqlen]`` of ``dataset``, tokenised by the first folder with a tokenizer."""
    text = load_text(dataset, split="eval")
    error: MoequantError | None = None
    for folder in tokenizer_dirs:
        try:
            tokenizer = load_tokenizer(folder)
            break
        except MoequantError as exc:
            error = error or exc
    else:
        raise error or MoequantError("no tokenizer folder given")
    return consecutive_windows(tokenize(tokenizer, text, progress), seqlen, max_windows)


def evaluate(
    model: str | Path,
    baseline: str | Path | None = None,
    dataset: str = "builtin",
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str = "auto",
    batch: int = 0,
    engine: str = "streamed",
    dtype: str = "float32",
    windows: torch.Tensor | None = None,
    progress: Progress | None = None,
    expert_slots: int | None = None,
) -> dict:
    """Evaluate ``model`` (against ``baseline``) and return the report (see :mod:`moequant.evals.report`).

    Args:
        model, baseline: checkpoint folders or hub ids, original or compressed.
        dataset: ``builtin``, ``wikitext2``, ``c4`` or a text file (its held-out split).
        seqlen: tokens per window, capped at the model's maximum positions.
        max_windows: keep only the first windows.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch: windows per forward chunk (0: automatic).
        engine: ``streamed`` (one layer at a time; default) or ``memory`` (whole models).
        dtype: compute dtype, ``float32`` (default), ``bfloat16`` or ``float16``.
        windows: token windows ``[W, L]`` to score instead of tokenising ``dataset`` (which then only
            labels the report).
        progress: receives progress events.
        expert_slots: with ``engine="memory"``, offload the compressed model's experts behind a cache of
            this many per layer; the report gets the cache's statistics.
    """
    EvalSettings(seqlen, max_windows, batch, engine, dtype)
    source = resolve_source(model)
    base_source = resolve_source(baseline) if baseline is not None else None
    configs = [CheckpointReader(p).config for p in (source, base_source) if p is not None]
    max_positions = min(adapter_for(c).config.max_position_embeddings for c in configs)
    dev = resolve_device(device)
    if windows is None:
        seqlen = min(seqlen, max_positions)
        folders = [source] + ([base_source] if base_source is not None else [])
        windows = evaluation_windows(dataset, folders, seqlen, max_windows, progress)
    elif windows.shape[1] > max_positions:
        raise MoequantError(f"windows of {windows.shape[1]} tokens exceed the model's {max_positions} positions")
    result = evaluate_windows(source, windows, base_source, device=dev, dtype=DTYPES[dtype], batch=batch,
                              engine=engine, progress=progress, expert_slots=expert_slots)
    extra = {"device": str(dev), "dtype": dtype}
    if result.expert_cache is not None:
        extra["expert_cache"] = result.expert_cache
    return build_report(result, source, base_source, dataset_label(dataset), extra)
