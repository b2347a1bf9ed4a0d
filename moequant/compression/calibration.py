"""Calibration data: which windows of which text calibrate a compression run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moequant.arch.base import Architecture
from moequant.calib import load_text, load_tokenizer, random_windows, tokenize
from moequant.errors import MoequantError
from moequant.numeric import SEED_MAX, check_int
from moequant.progress import Progress

RANDOM_CALIB = "random"  # uniformly random token ids: for timing runs, never for real calibration
_ACTIVATION_BUDGET = 64 << 20  # floats per forward chunk


@dataclass
class CalibSettings:
    """Calibration data: a dataset name or text file, and how many windows of what length."""

    source: str = "builtin"
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise MoequantError(f"--calib must name a dataset or a text file; got {self.source!r}")
        check_int(self.samples, "--samples", 1, meaning="calibration windows")
        check_int(self.seqlen, "--seqlen", 1, meaning="tokens per calibration window")
        check_int(self.seed, "--seed", 0, SEED_MAX)


def calibration_ids(source: Path, calib: CalibSettings, arch: Architecture,
                    progress: Progress) -> tuple[torch.Tensor, dict]:
    """The calibration windows ``[samples, seqlen]`` (int64) and their description for the record."""
    seqlen = min(calib.seqlen, arch.config.max_position_embeddings)
    if calib.source == RANDOM_CALIB:
        gen = torch.Generator().manual_seed(calib.seed)
        ids = torch.randint(0, arch.config.vocab_size, (calib.samples, seqlen), generator=gen)
    else:
        try:
            tokenizer = load_tokenizer(source)
        except MoequantError as exc:
            raise MoequantError(f"{exc} (or compress without calibration: --method rtn)") from exc
        tokens = tokenize(tokenizer, load_text(calib.source, "calib"), progress)
        ids = random_windows(tokens, calib.samples, seqlen, calib.seed)
    info = {"dataset": calib.source, "samples": calib.samples, "seqlen": seqlen, "seed": calib.seed,
            "tokens": int(ids.numel())}
    return ids, info


def windows_per_chunk(calib: CalibSettings, arch: Architecture) -> int:
    """Windows per forward chunk, so a chunk's activations stay around 64M floats."""
    per_window = max(1, calib.seqlen) * max(arch.config.hidden_size, arch.config.intermediate_size)
    return max(1, min(calib.samples, _ACTIVATION_BUDGET // per_window))
