"""Calibration and evaluation text: named datasets, files, tokenising and windows."""

from __future__ import annotations

from pathlib import Path

import torch

from moequant.errors import MoequantError, first_line
from moequant.numeric import check_int
from moequant.progress import Progress

BUILTIN = "builtin"
LARGE_TEXT = 1_000_000  # characters; tokenising more shows progress
ONLINE = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "c4": ("allenai/c4", "en", "text"),
}
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def load_text(name: str, split: str = "calib") -> str:
    """Raw text for a built-in name or a text file.

    ``split`` is ``"calib"`` (calibration: the training/calibration split of a dataset) or
    ``"eval"`` (the held-out/test split). Names: ``builtin`` (the bundled text, offline),
    ``wikitext2``, ``c4`` (through ``datasets``; online), or a path to a UTF-8 text file.
    """
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise MoequantError(f"{path} is not UTF-8 text; pass a plain text file") from exc
    if name == BUILTIN:
        from moequant.builtin_data import builtin_text

        return builtin_text("calib" if split == "calib" else "eval")
    if name in ONLINE:
        return _dataset_text(name, split)
    raise MoequantError(f"unknown dataset {name!r}: pass builtin, wikitext2, c4 or a path to a text file")


def _dataset_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise MoequantError(
            f"dataset {name} needs the datasets package (pip install 'moequant[datasets]'), or pass a text file"
        ) from exc
    path, config, field = ONLINE[name]
    try:
        if name == "c4":
            c4_split = "train" if split == "calib" else "validation"
            data = datasets.load_dataset(path, data_files={c4_split: _C4_FILES[c4_split]}, split=c4_split)
            rows = data[field][:20000] if split == "calib" else data[field][:1100]
            return "\n\n".join(rows)
        data = datasets.load_dataset(path, config, split="train" if split == "calib" else "test")
        return "\n\n".join(data[field])
    except Exception as exc:
        raise MoequantError(
            f"could not load dataset {name} ({first_line(exc)}); "
            "when offline, pass a text file instead"
        ) from exc


def load_tokenizer(model_dir: Path):
    """The tokenizer saved beside a checkpoint (no remote code).

    transformers reads ``config.json`` too when it loads a tokenizer, so a failure is put down to
    config.json where transformers refuses that, and to the tokenizer files otherwise.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        _refuse_config_if_unreadable(model_dir)
        raise MoequantError(
            f"no usable tokenizer in {model_dir} ({first_line(exc)}); calibration, evaluation and generation "
            "need the tokenizer files beside the weights"
        ) from exc


def _refuse_config_if_unreadable(model_dir: Path) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        raise MoequantError(
            f"transformers refuses {Path(model_dir) / 'config.json'} ({first_line(exc)}), so it cannot load the "
            "tokenizer beside it; fix config.json"
        ) from exc


def tokenize(tokenizer, text: str, progress: Progress | None = None) -> torch.Tensor:
    """The whole text as one ``int64 [N]`` token sequence, without special tokens.

    The text is tokenised in one call (cutting it could change the tokens at the cuts); for texts
    over :data:`LARGE_TEXT` characters ``progress`` shows a step that runs while it does.
    """
    large = progress is not None and len(text) > LARGE_TEXT
    if large:
        progress.begin(1, f"tokenising {len(text) / 1e6:.1f}M characters of text")
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    finally:
        if large:
            progress.advance(0)
            progress.end()
    return torch.tensor(ids, dtype=torch.int64)


def check_token_ids(ids: torch.Tensor, rows: int, table: str) -> None:
    """Refuse token ids outside the ``rows`` of the embedding ``table``: the tokenizer is not the model's."""
    if ids.numel() and (int(ids.max()) >= rows or int(ids.min()) < 0):
        raise MoequantError(
            f"token ids up to {int(ids.max())}, past the {rows} rows of {table}: the tokenizer's vocabulary is not "
            "the model's; use the model's own tokenizer"
        )


def random_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at random offsets drawn with ``seed``: ``[S, L]``.

    Offsets are drawn with replacement from the ``N - seqlen + 1`` that ``tokens [N]`` holds; asking
    for more windows than that is refused, since it could only repeat windows.
    """
    check_int(samples, "--samples", 1, meaning="calibration windows")
    check_int(seqlen, "--seqlen", 1, meaning="tokens per calibration window")
    n = tokens.numel()
    if n < seqlen:
        raise MoequantError(
            f"calibration text has {n} tokens, fewer than one window of {seqlen}; lower --seqlen or give a longer text"
        )
    distinct = n - seqlen + 1
    if samples > distinct:
        raise MoequantError(
            f"calibration text has {n} tokens: at most {distinct} distinct windows of {seqlen} tokens, fewer than "
            f"--samples {samples}; pass --samples {distinct} or less, a shorter --seqlen, or a longer text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (samples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def consecutive_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[W, L]``; the remainder is dropped."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise MoequantError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seqlen].view(n, seqlen)
