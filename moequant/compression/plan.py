"""From a recipe to the storage spec of every linear module, checked against the model's shapes."""

from __future__ import annotations

from dataclasses import replace

from moequant.arch.base import Architecture, LinearInfo
from moequant.errors import MoequantError
from moequant.packed.shapes import check_packable
from moequant.packed.widths import stored_group_size
from moequant.quant.types import QuantSpec
from moequant.recipe import Recipe


def plan(arch: Architecture, recipe: Recipe, method: str | None = None) -> dict[str, QuantSpec | None]:
    """The spec of every linear module by name (``None``: kept 16-bit); ``method`` overrides the recipe's solver."""
    specs: dict[str, QuantSpec | None] = {}
    infos = [i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)]
    for info in infos + arch.global_linears():
        spec = recipe.spec_for(info, method)
        if spec is not None:
            spec = replace(spec, group_size=stored_group_size(spec.group_size, info.in_features))
            _check_spec(info, spec, recipe)
        specs[info.name] = spec
    _check_listed(recipe, specs)
    return specs


def first_spec(arch: Architecture, recipe: Recipe, kind: str) -> QuantSpec | None:
    """The spec ``recipe`` gives the first module of ``kind`` in ``arch`` (e.g. to set up another tool alike)."""
    infos = [i for layer in range(arch.config.num_layers) for i in arch.layer_linears(layer)]
    info = next((i for i in infos + arch.global_linears() if i.kind == kind), None)
    return None if info is None else recipe.spec_for(info)


def _check_listed(recipe: Recipe, specs: dict[str, QuantSpec | None]) -> None:
    """Refuse rules that list modules by name which the model lacks (a plan made for another model)."""
    for i, rule in enumerate(recipe.rules):
        missing = [m for m in rule.modules or () if m not in specs]
        if missing:
            raise MoequantError(f"recipe {recipe.name}, rule {i + 1} lists {len(missing)} module(s) this model does not "
                                f"have, e.g. {missing[0]}; was it planned for another model?")


def _check_spec(info: LinearInfo, spec: QuantSpec, recipe: Recipe) -> None:
    rule = recipe.rule_for(info)
    where = f"recipe {recipe.name}, rule {rule[0] + 1} ({rule[1].describe()})" if rule else f"recipe {recipe.name}"
    if info.kind == "router":
        raise MoequantError(f"{where} would quantise the router {info.name}; routers stay 16-bit, narrow the match")
    if info.kind == "embedding":
        raise MoequantError(f"{where} would quantise {info.name}; embeddings stay 16-bit in the GPTQ layout")
    try:
        check_packable(info.out_features, info.in_features, spec.bits, spec.group_size)
    except MoequantError as exc:
        raise MoequantError(
            f"{where}: {info.name} cannot be packed: {exc}; keep such modules 16-bit with a rule "
            "'bits: 16' placed before this one"
        ) from exc
