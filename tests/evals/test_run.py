"""From dataset names to reports: tokenising once, consecutive windows, capped lengths."""

import pytest
import torch

from moequant.builtin_data import builtin_text
from moequant.calib import LARGE_TEXT, load_tokenizer, random_windows, tokenize
from moequant.errors import MoequantError
from moequant.evals.report import windows_hash
from moequant.evals.run import evaluate
from moequant.progress import Progress
from tests.conftest import make_mixtral


def add_tokenizer(folder, vocab_size: int = 200) -> None:
    """Save a word-level tokenizer trained on the bundled eval text into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(builtin_text("eval").splitlines(),
                            trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    path = make_mixtral(tmp_path_factory.mktemp("run") / "m", seed=2, max_position_embeddings=64)
    add_tokenizer(path)
    return path


def test_builtin_windows_are_consecutive_and_capped(model_with_tokenizer):
    tokens = tokenize(load_tokenizer(model_with_tokenizer), builtin_text("eval"))
    report = evaluate(model_with_tokenizer, dataset="builtin", seqlen=2048, max_windows=3, device="cpu")
    assert report["seqlen"] == 64 and report["windows"] == 3 and report["tokens"] == 3 * 63
    assert report["windows_hash"] == windows_hash(tokens[: 3 * 64].view(3, 64))
    assert report["dataset"] == "builtin" and report["baseline"] is None


def test_text_file_dataset_and_all_windows(model_with_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(builtin_text("eval")[:3000])
    tokens = tokenize(load_tokenizer(model_with_tokenizer), text.read_text())
    report = evaluate(model_with_tokenizer, dataset=str(text), seqlen=32, device="cpu")
    assert report["windows"] == tokens.numel() // 32
    assert report["dataset"] == str(text.resolve())


def test_compressed_model_uses_its_copied_tokenizer(model_with_tokenizer, tmp_path):
    from moequant.compression import compress

    out = compress(model_with_tokenizer, tmp_path / "q", method="rtn").path
    report = evaluate(out, baseline=model_with_tokenizer, seqlen=16, max_windows=2, device="cpu")
    assert report["baseline"] == str(model_with_tokenizer) and 0 < report["router_agreement"] <= 1


def test_bad_inputs_refused(model_with_tokenizer, tmp_path):
    with pytest.raises(MoequantError, match="unknown dataset"):
        evaluate(model_with_tokenizer, dataset="wikitext9", device="cpu")
    with pytest.raises(MoequantError, match="dtype"):
        evaluate(model_with_tokenizer, dtype="float8", device="cpu")
    with pytest.raises(MoequantError, match="tokenizer"):
        evaluate(make_mixtral(tmp_path / "bare"), seqlen=16, device="cpu")
    with pytest.raises(MoequantError, match="positions"):
        evaluate(model_with_tokenizer, windows=torch.zeros(1, 65, dtype=torch.long), device="cpu")


class _Recorder(Progress):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def begin(self, total: int, title: str) -> None:
        self.events.append(("begin", total, title))

    def advance(self, step: int, info: dict | None = None) -> None:
        self.events.append(("advance", step))

    def end(self) -> None:
        self.events.append(("end",))


def test_tokenising_a_large_text_shows_progress_and_gives_the_same_tokens(model_with_tokenizer):
    tokenizer = load_tokenizer(model_with_tokenizer)
    text = (builtin_text("eval") * (LARGE_TEXT // len(builtin_text("eval")) + 1))[: LARGE_TEXT + 1]
    recorder = _Recorder()
    shown = tokenize(tokenizer, text, recorder)
    assert [e[0] for e in recorder.events] == ["begin", "advance", "end"] and "tokenising" in recorder.events[0][2]
    assert torch.equal(shown, tokenize(tokenizer, text))
    small = _Recorder()
    tokenize(tokenizer, text[:1000], small)
    assert small.events == []


def test_more_calibration_windows_than_the_text_holds_are_refused():
    tokens = torch.arange(100)
    assert random_windows(tokens, 91, 10, 0).shape == (91, 10)
    with pytest.raises(MoequantError, match=r"at most 91 distinct windows of 10 tokens.*--samples 91 or less"):
        random_windows(tokens, 92, 10, 0)
    with pytest.raises(MoequantError, match=r"at most 91 distinct windows"):
        random_windows(tokens, 100_000_000, 10, 0)
