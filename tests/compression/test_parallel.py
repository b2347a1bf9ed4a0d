"""Expert-parallel compression: torchrun with gloo on the CPU against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moequant.compression import CalibSettings, compress
from moequant.compression.parallel import deal, expert_cost
from moequant.errors import MoequantError
from tests.conftest import StopAfterLayers

ARGS = ("--samples", "8", "--seqlen", "64", "--device", "cpu")


def run(procs: int, *args: str) -> subprocess.CompletedProcess:
    """``moequant`` under torchrun with ``procs`` processes (one thread each), or alone."""
    launcher = [sys.executable, "-m", "moequant"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "moequant"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=600)


def weights(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_mixtral_tok):
    out = tmp_path_factory.mktemp("parallel") / "one"
    done = run(1, "compress", str(tiny_mixtral_tok), "-o", str(out), *ARGS)
    assert done.returncode == 0, done.stderr
    return out


def test_two_processes_write_the_bytes_of_one(tmp_path, tiny_mixtral_tok, single):
    out = tmp_path / "two"
    done = run(2, "compress", str(tiny_mixtral_tok), "-o", str(out), *ARGS)
    assert done.returncode == 0, done.stderr
    assert weights(out) == weights(single)
    layers = json.loads((out / "moequant.json").read_text())["layers"]
    assert all(layer["shared_bytes"] > 0 for layer in layers)


def test_resume_with_another_process_count(tmp_path, tiny_mixtral_tok, single):
    out = tmp_path / "resumed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(MoequantError, match="stopped"):
            compress(tiny_mixtral_tok, out, calib=CalibSettings(samples=8, seqlen=64), device="cpu",
                     progress=StopAfterLayers(1))
    finally:
        torch.set_num_threads(threads)
    done = run(2, "compress", str(tiny_mixtral_tok), "-o", str(out), "--resume", *ARGS)
    assert done.returncode == 0, done.stderr
    assert weights(out) == weights(single)


def test_a_failing_rank_is_named_in_one_line(tmp_path):
    done = run(2, "compress", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), *ARGS)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert any(line.startswith("error: rank 0: no such folder") for line in lines), done.stderr
    assert "Traceback" not in "\n".join(lines)


def test_experts_dealt_by_cost_not_index():
    costs = {e: expert_cost(rows, 128, 256) for e, rows in enumerate([1000, 10, 10, 10, 990, 10, 10, 10])}
    owner = deal(costs, 2)
    assert owner[0] != owner[4]  # the two busy experts go to different ranks
    load = [sum(c for e, c in costs.items() if owner[e] == r) for r in range(2)]
    assert max(load) / min(load) < 1.1
    assert deal(costs, 2) == owner
