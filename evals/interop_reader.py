"""Load a moequant checkpoint with another reader and save its logits on given token ids.

Runs inside the environment that `evals/interop.py` builds (GPTQModel, compressed-tensors, optimum
and transformers, without moequant), so that each reader is the package itself:

- ``gptqmodel``: ``GPTQModel.load(path, backend=TORCH)`` on the CPU;
- ``compressed-tensors``: the package's own config parsing, target matching and decompression
  (`tests/compressed_tensors_reader.py`), the weights then run in transformers' float model;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(path)`` as a user would call it;
- ``vllm`` (CUDA): greedy tokens, saved instead of logits;
- ``gptqmodel-quantize``: no reading; GPTQModel quantises the model and writes its own checkpoint to
  ``--out``, for moequant to read.

    READER_PYTHON evals/interop_reader.py --reader gptqmodel --model DIR --ids ids.safetensors \\
        --out logits.safetensors [--dtype float16]

Prints one JSON object: the reader, its version, seconds to load, and any warning it logged about
missing or unexpected weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def load_gptqmodel(path: Path, dtype: torch.dtype):
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=dtype), gptqmodel.__version__


def load_compressed_tensors(path: Path, dtype: torch.dtype):
    """compressed-tensors' decompressed weights in transformers' float model of the checkpoint's family."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.compressed_tensors_reader import decompressed_weights

    weights = decompressed_weights(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, t in load_file(file).items():
            if not name.rsplit(".", 1)[-1].startswith("weight_"):
                tensors[name] = t.float()
    tensors.update({f"{module}.weight": w.float() for module, w in weights.items()})
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    dest = Path(tempfile.mkdtemp(prefix="ct-float-"))
    (dest / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dest / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=dtype)
    return model, __import__("compressed_tensors").__version__


def load_transformers(path: Path, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu"), transformers.__version__


READERS = {"gptqmodel": load_gptqmodel, "compressed-tensors": load_compressed_tensors,
           "transformers": load_transformers}


def gptqmodel_quantize(source: Path, out: Path, calib_text: str, bits: int) -> str:
    """Quantise ``source`` with GPTQModel itself (GPTQ, ``bits``, groups of 128) and save it to ``out``."""
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    chunks = [calib_text[i:i + 600] for i in range(0, min(len(calib_text), 600 * 32), 600)]
    model = GPTQModel.load(str(source), QuantizeConfig(bits=bits, group_size=128, sym=True, desc_act=False),
                           device="cpu")
    model.quantize(chunks, batch_size=4)
    model.save(str(out))
    return gptqmodel.__version__


def vllm_greedy(path: Path, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, str]:
    """vLLM's greedy continuation ``[B, new_tokens]`` of each row of ``ids`` (CUDA, float16)."""
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float16", enforce_eager=True, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": row.tolist()} for row in ids], params)
    return torch.tensor([list(o.outputs[0].token_ids) for o in outputs]), vllm.__version__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reader", choices=[*READERS, "vllm", "gptqmodel-quantize"], required=True)
    ap.add_argument("--calib-text", help="gptqmodel-quantize: a text file to calibrate on")
    ap.add_argument("--bits", type=int, default=4, help="gptqmodel-quantize: code width")
    ap.add_argument("--new-tokens", type=int, default=32, help="vllm: greedy tokens generated per row")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--ids", help="token ids to score (every reader but gptqmodel-quantize)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.reader == "gptqmodel-quantize":
        version = gptqmodel_quantize(args.model, Path(args.out), Path(args.calib_text).read_text(), args.bits)
        print(json.dumps({"reader": args.reader, "version": version, "seconds": round(time.perf_counter() - t0, 2)}))
        return
    ids = load_file(args.ids)["ids"]
    if args.reader == "vllm":
        tokens, version = vllm_greedy(args.model, ids, args.new_tokens)
        save_file({"tokens": tokens.contiguous()}, args.out)
        print(json.dumps({"reader": "vllm", "version": version, "seconds": round(time.perf_counter() - t0, 2)}))
        return
    model, version = READERS[args.reader](args.model, dtype)
    load_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids[i:i + 1]).logits.float() for i in range(ids.shape[0])])
    save_file({"logits": logits.contiguous()}, args.out)
    print(json.dumps({"reader": args.reader, "version": version, "load_s": round(load_s, 2),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
