from pydoc_data.topics import topics

import pytest

from moequant.builtin_data import (
    BUNDLED_MODEL_DIR,
    SPLITS,
    builtin_text,
    bundled_model_path,
    nearest_paragraph_break,
    split_text,
)
from moequant.errors import MoequantError


def test_splits_are_non_empty_and_deterministic():
    for split in SPLITS:
        text = builtin_text(split)
        assert text.strip()
        assert builtin_text(split) == text


def test_splits_are_disjoint_and_in_order():
    train, calib, evaluation = (builtin_text(s) for s in SPLITS)
    corpus = "\n\n".join(topics[k].strip("\n") for k in sorted(topics))
    start_calib = corpus.index(calib)
    start_eval = corpus.index(evaluation)
    assert corpus.startswith(train)
    assert len(train) <= start_calib
    assert start_calib + len(calib) <= start_eval
    assert corpus.endswith(evaluation)
    # nothing but paragraph breaks lost between the pieces
    assert len(train) + len(calib) + len(evaluation) >= len(corpus) - 8


def test_split_proportions():
    sizes = {s: len(builtin_text(s)) for s in SPLITS}
    total = sum(sizes.values())
    assert sizes["train"] / total == pytest.approx(0.8, abs=0.02)
    assert sizes["calib"] / total == pytest.approx(0.1, abs=0.02)
    assert sizes["eval"] / total == pytest.approx(0.1, abs=0.02)


def test_cuts_fall_on_paragraph_breaks():
    paragraphs = [f"paragraph {i} " + "word " * (i % 7 + 3) for i in range(200)]
    text = "\n\n".join(paragraphs)
    parts = split_text(text)
    for part in parts.values():
        assert part.startswith("paragraph ")
        assert part.rstrip().endswith("word")
    assert "\n\n".join(parts.values()) == text


def test_nearest_paragraph_break_picks_closest():
    text = "aaaa\n\nbbbbbbbbbb\n\ncc"
    assert nearest_paragraph_break(text, 5) == 4
    assert nearest_paragraph_break(text, 15) == 16
    assert nearest_paragraph_break("no breaks here", 5) == 5


def test_too_short_text_errors():
    with pytest.raises(MoequantError):
        split_text("abc")


def test_unknown_split_errors():
    with pytest.raises(MoequantError, match="unknown split"):
        builtin_text("test")


def test_bundled_model_path_missing(monkeypatch, tmp_path):
    import moequant.builtin_data as bd

    monkeypatch.setattr(bd, "BUNDLED_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(MoequantError, match="bundled model is missing"):
        bd.bundled_model_path()


def test_bundled_model_path_points_at_assets():
    assert BUNDLED_MODEL_DIR.name == "tiny-mixtral"
    assert BUNDLED_MODEL_DIR.parent.name == "assets"
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        assert bundled_model_path() == BUNDLED_MODEL_DIR
