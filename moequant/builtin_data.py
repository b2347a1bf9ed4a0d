"""The text and the small model that ship inside moequant.

The text is the prose of the Python documentation topics (``pydoc_data.topics``), present in
every CPython install, so demos, calibration and evaluation run offline. It is split once, the
same way every time: topics sorted by key and joined with blank lines, then cut by characters
into the first 80% ("train"), the next 10% ("calib") and the last 10% ("eval"), each cut moved
to the nearest paragraph boundary.
"""

from __future__ import annotations

import functools
from pathlib import Path

from moequant.errors import MoequantError

SPLITS = ("train", "calib", "eval")
_CUT_FRACTIONS = (0.8, 0.9)

BUNDLED_MODEL_DIR: Path = Path(__file__).resolve().parent / "assets" / "tiny-mixtral"


def nearest_paragraph_break(text: str, target: int) -> int:
    """Index of the blank-line break closest to ``target`` (the ``target`` itself if none).

    The returned index points at the first newline of a ``"\\n\\n"``, so ``text[:i]`` ends a
    paragraph and ``text[i:]`` starts at the break.
    """
    before = text.rfind("\n\n", 0, target + 2)
    after = text.find("\n\n", target)
    candidates = [i for i in (before, after) if i > 0]  # -1: not found; 0: empty first part
    if not candidates:
        return target
    return min(candidates, key=lambda i: abs(i - target))


def split_text(text: str, fractions: tuple[float, float] = _CUT_FRACTIONS) -> dict[str, str]:
    """Cut ``text`` into train / calib / eval at paragraph breaks near ``fractions`` of its length."""
    first = nearest_paragraph_break(text, int(len(text) * fractions[0]))
    second = nearest_paragraph_break(text, int(len(text) * fractions[1]))
    if not 0 < first < second < len(text):
        raise MoequantError("text is too short to split into train/calib/eval; give a longer text")
    return {
        "train": text[:first].strip("\n"),
        "calib": text[first:second].strip("\n"),
        "eval": text[second:].strip("\n"),
    }


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Python builds may leave it out
        raise MoequantError(
            "the bundled text needs the standard-library module pydoc_data; use a full CPython install"
        ) from exc
    corpus = "\n\n".join(topics[key].strip("\n") for key in sorted(topics))
    return split_text(corpus)


def builtin_text(split: str) -> str:
    """The bundled text of one split: ``"train"``, ``"calib"`` or ``"eval"``."""
    if split not in SPLITS:
        raise MoequantError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return _splits()[split]


def bundled_model_path() -> Path:
    """Folder of the bundled tiny Mixtral model (config, safetensors weights, tokenizer)."""
    if not (BUNDLED_MODEL_DIR / "config.json").is_file():
        raise MoequantError(
            f"the bundled model is missing from {BUNDLED_MODEL_DIR}; reinstall moequant "
            "or rebuild it with evals/train_bundled.py"
        )
    return BUNDLED_MODEL_DIR
