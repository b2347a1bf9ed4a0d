"""Peak memory of the ``moequant compress`` process does not grow with the number of layers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import make_mixtral

# Mixtral-8x7B's layer structure at a quarter of its width: below glibc's 32 MB mmap threshold
# every weight and code tensor comes from the heap, where freed layers used to stay resident.
SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=256)
# One layer's weights in bf16: 8 experts x 3 x 1024 x 3584 plus attention, about 181 MB.
LAYER_BYTES = 2 * (8 * 3 * 1024 * 3584 + 2 * 1024 * 1024 + 2 * 1024 * 256 + 8 * 1024)

_PROBE = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)"
)


def compress_peak_rss(src, out) -> int:
    """Peak resident bytes of ``moequant compress --method rtn`` run as its own process."""
    cmd = [sys.executable, "-m", "moequant_cli.main", "compress", str(src), "-o", str(out), "--method", "rtn",
           "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *cmd], capture_output=True, text=True, timeout=300)
    peak, rc = proc.stdout.split()[-2:]
    assert rc == "0", proc.stderr[-2000:]
    return int(peak)


@pytest.mark.slow
def test_peak_memory_is_that_of_one_layer_whatever_the_layer_count(tmp_path):
    peaks = {}
    for layers in (2, 6):
        src = make_mixtral(tmp_path / f"src{layers}", dtype=torch.bfloat16, num_hidden_layers=layers, **SHAPE)
        peaks[layers] = compress_peak_rss(src, tmp_path / f"out{layers}")
    growth = peaks[6] - peaks[2]
    assert growth < 0.25 * LAYER_BYTES, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB from 2 to 6 layers ({LAYER_BYTES / 2**20:.0f} MiB per layer)"
    )
