import pytest
import torch

from moequant.arch.registry import adapter_for
from moequant.budget.sizes import fixed_bytes
from moequant.checkpoint import compressed_tensors as ct
from moequant.checkpoint.output_form import OutputForm, module_bytes
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression import compress
from moequant.compression.plan import plan as recipe_specs
from moequant.quant.pack import pack_result
from moequant.quant.rtn import rtn
from moequant.quant.types import QuantSpec
from moequant.recipe import load_recipe


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("bits, group, sym", [(2, 128, True), (4, 64, False), (8, -1, True)])
def test_module_bytes_are_what_is_stored(fmt, bits, group, sym):
    n, k = 96, 256
    spec = QuantSpec(bits=bits, group_size=group, sym=sym)
    packed = pack_result(rtn(torch.randn(n, k), bits, group, sym), bits)
    tensors = ct.to_compressed(packed, spec, k) if fmt == "compressed-tensors" else packed
    assert module_bytes(OutputForm(fmt), n, k, spec) == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("fmt, recipe", [("gptq", "a4e3"), ("compressed-tensors", "a4e4")])
def test_folder_bound_holds_and_is_tight(tmp_path, tiny_mixtral_tok, fmt, recipe):
    out = compress(tiny_mixtral_tok, tmp_path / "o", recipe=recipe, method="rtn", output_format=fmt).path
    reader = CheckpointReader(tiny_mixtral_tok)
    arch = adapter_for(reader.config)
    bound = fixed_bytes(reader, arch, recipe_specs(arch, load_recipe(recipe)), OutputForm(fmt), set(),
                        tiny_mixtral_tok)
    actual = sum(f.stat().st_size for f in out.iterdir())
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert actual <= bound <= actual + 0.1 * weights
