"""From dataset names to reports: tokenising once, consecutive windows, capped lengths."""

import pytest
import torch

from moequant.builtin_data import builtin_text
from moequant.calib import load_tokenizer, tokenize
from moequant.errors import MoequantError
from moequant.evals.report import windows_hash
from moequant.evals.run import evaluate
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
    from moequant.pipeline import compress

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
