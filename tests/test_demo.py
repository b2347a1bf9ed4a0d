import pytest

from moequant.builtin_data import BUNDLED_MODEL_DIR
from moequant.compression import CalibSettings
from moequant.demo import run_demo

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "config.json").is_file(), reason="bundled model missing")


def test_demo_gptq_beats_rtn_on_the_bundled_model(tmp_path):
    runs = run_demo(tmp_path, recipe="a4e2", calib=CalibSettings("builtin", 16, 256, 0), seqlen=256)
    gptq, rtn = runs
    assert (gptq.label, rtn.label) == ("a4e2-gptq", "a4e2-rtn")
    for run in runs:
        assert run.report_path.is_file() and run.report_path.with_suffix(".md").is_file()
        assert run.report["kl_divergence"]["mean"] > 0
        assert run.report["windows"] > 0 and 0 < run.report["router_agreement"] <= 1
    assert gptq.report["baseline_perplexity"] == rtn.report["baseline_perplexity"]
    assert gptq.report["windows_hash"] == rtn.report["windows_hash"]
    assert gptq.report["perplexity"] < rtn.report["perplexity"]
    assert gptq.report["kl_divergence"]["mean"] < rtn.report["kl_divergence"]["mean"]
