"""Reports: every key, sizes from records or files, hashes, Markdown and chart."""

import json
import shutil

import pytest
import torch

from moequant.checkpoint.reader import CheckpointReader
from moequant.compression import compress
from moequant.errors import MoequantError
from moequant.evals.perplexity import perplexity
from moequant.evals.report import (
    REPORT_KEYS,
    build_report,
    checkpoint_size,
    load_report,
    windows_hash,
    write_report,
)
from moequant.evals.streamed import evaluate_windows
from tests.conftest import make_mixtral


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    original = make_mixtral(root / "orig", seed=11)
    return original, compress(original, root / "rtn", method="rtn").path


def test_report_has_every_key_and_round_trips(pair, tmp_path):
    original, compressed = pair
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(4))
    result = evaluate_windows(compressed, ids, baseline=original)
    report = build_report(result, compressed, original, "tokens", {"device": "cpu"})
    assert set(REPORT_KEYS) <= set(report)
    assert report["windows"] == 3 and report["seqlen"] == 24 and report["tokens"] == 3 * 23
    assert report["perplexity"] == pytest.approx(perplexity(result.nll))
    assert report["baseline_perplexity"] == pytest.approx(perplexity(result.base_nll))
    assert set(report["kl_divergence"]) == {"mean", "median", "p99"}
    assert len(report["router_agreement_per_layer"]) == len(report["hidden_error_per_layer"]) == 2
    assert report["router_agreement"] == pytest.approx(sum(report["router_agreement_per_layer"]) / 2)
    record = json.loads((compressed / "moequant.json").read_text())
    assert report["size_bytes"] == record["totals"]["bytes"]
    assert report["bits_per_weight"] == record["totals"]["bits_per_weight"]
    assert report["baseline_size_bytes"] == CheckpointReader(original).total_bytes()
    assert report["recipe"]["name"] == record["recipe"]["name"]
    assert report["device"] == "cpu"

    paths = write_report(report, tmp_path / "r.json")
    assert load_report(paths["json"]) == json.loads(json.dumps(report))
    md = paths["md"].read_text()
    assert "KL(baseline" in md and "| 1 |" in md
    pytest.importorskip("matplotlib")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_baseline(pair, tmp_path):
    original, _ = pair
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    report = build_report(evaluate_windows(original, ids), original, None, "tokens")
    assert report["baseline"] is None and report["kl_divergence"] is None and report["perplexity_stderr"] is None
    paths = write_report(report, tmp_path / "solo.json")
    assert paths["png"] is None and not (tmp_path / "solo.png").exists()
    assert set(REPORT_KEYS) <= set(load_report(paths["json"]))


def test_sizes_from_files_when_no_record(pair, tmp_path):
    original, compressed = pair
    reader = CheckpointReader(original)
    orig = checkpoint_size(original)
    assert orig["bytes"] == reader.total_bytes()
    assert orig["parameters"] == sum(reader.numel(n) for n in reader.names)
    assert orig["bits_per_weight"] == pytest.approx(8 * orig["bytes"] / orig["parameters"])
    bare = tmp_path / "bare"
    shutil.copytree(compressed, bare)
    (bare / "moequant.json").unlink()
    size = checkpoint_size(bare)
    assert size["parameters"] == orig["parameters"]
    assert size["bytes"] == CheckpointReader(bare).total_bytes()
    assert size["bits_per_weight"] < orig["bits_per_weight"] / 3


def test_windows_hash_tells_data_apart():
    ids = torch.arange(20).view(2, 10)
    assert windows_hash(ids) == windows_hash(ids.clone().to(torch.int32))
    changed = ids.clone()
    changed[1, 3] += 1
    assert windows_hash(changed) != windows_hash(ids)
    assert windows_hash(ids.view(4, 5)) != windows_hash(ids)


def test_load_report_refuses_other_json(tmp_path):
    other = tmp_path / "x.json"
    other.write_text('{"model": "m"}')
    with pytest.raises(MoequantError, match="not a moequant eval report"):
        load_report(other)


def test_non_finite_scores_are_refused_with_their_windows():
    from moequant.evals.streamed import EvalResult

    windows = torch.zeros(4, 8, dtype=torch.long)
    nll = torch.ones(4, 7)
    nll[2, 5] = float("nan")
    nll[3, 0] = float("inf")
    result = EvalResult(windows, nll, torch.zeros(1, 32, 2, dtype=torch.int16))
    with pytest.raises(MoequantError, match=r"the model's logits are not finite \(NaN or Inf\) on windows 2, 3 of 4"):
        build_report(result, "m", None, "d")
    kl = torch.zeros(4, 7)
    kl[0, 0] = float("nan")
    both = EvalResult(windows, torch.ones(4, 7), torch.zeros(1, 32, 2, dtype=torch.int16), base_nll=torch.ones(4, 7),
                      kl=kl, top1=torch.ones(4, 7, dtype=torch.bool),
                      base_topk_ids=torch.zeros(1, 32, 2, dtype=torch.int16))
    with pytest.raises(MoequantError, match=r"on windows 0 of 4, so there is no KL divergence"):
        build_report(both, "m", "b", "d")
    huge = EvalResult(windows, torch.full((4, 7), 800.0), torch.zeros(1, 32, 2, dtype=torch.int16))
    with pytest.raises(MoequantError, match="mean NLL is 800.0 nats, so its perplexity overflows"):
        build_report(huge, "m", None, "d")


@pytest.mark.parametrize("key, value, message", [
    ("perplexity", "12.5", r"field perplexity must be a number, got \"12.5\""),
    ("seqlen", 3.5, "field seqlen must be a whole number, got 3.5"),
    ("size_bytes", True, "field size_bytes must be a whole number, got true"),
    ("model", ["a"], "field model must be a string"),
    ("kl_divergence", [1, 2], "field kl_divergence must be an object or null"),
    ("kl_divergence", {"mean": "x", "median": 0.1, "p99": 0.2}, "field kl_divergence.mean must be a number"),
    ("top1_agreement", {}, "field top1_agreement must be a number or null"),
    ("recipe", "a4e3", "field recipe must be an object or null"),
])
def test_load_report_names_the_file_and_the_wrongly_typed_field(pair, tmp_path, key, value, message):
    original, compressed = pair
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    good = write_report(build_report(evaluate_windows(compressed, ids, baseline=original), compressed, original,
                                     "tokens"), tmp_path / "good.json")["json"]
    assert load_report(good)["windows"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(good.read_text()), key: value}))
    with pytest.raises(MoequantError, match=message) as info:
        load_report(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
