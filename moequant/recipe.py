"""Recipes: which modules get which bits (rules), and the algorithm settings (how).

A recipe is YAML::

    name: mixtral-a4e3
    method: gptq            # default solver for rules that do not say: gptq | rtn
    group_size: 128
    sym: true
    act_order: true
    damp: 0.01
    rules:                  # first match wins; re.fullmatch on the module's on-disk name
      - match: '.*\\.self_attn\\.(q|k|v|o)_proj'
        bits: 4
      - match: '.*\\.block_sparse_moe\\.experts\\.\\d+\\.w[123]'
        bits: 3

Modules no rule matches stay 16-bit. Routers and norms are never quantised; embeddings and
lm_head only when a rule names them.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moequant.errors import MoequantError, first_line
from moequant.quant.types import QuantSpec

CLIP_GRID = 20  # shrink factors 1.00, 0.98, ..., 0.62 of each group's range
KEEP_BITS = 16


class Rule(BaseModel):
    """Which modules a setting applies to, with optional per-rule overrides."""

    model_config = ConfigDict(extra="forbid")

    match: str
    bits: Literal[2, 3, 4, 8, 16]
    group_size: int | None = None
    sym: bool | None = None
    method: Literal["gptq", "rtn"] | None = None

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except (re.error, OverflowError, RecursionError) as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        return _check_group(value)


def _check_group(value: int | None) -> int | None:
    if value is not None and value != -1 and (value < 32 or value % 32):
        raise ValueError("must be -1 (one group per row) or a positive multiple of 32")
    return value


class Recipe(BaseModel):
    """A validated recipe. Settings at the top are defaults that rules may override."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    method: Literal["gptq", "rtn"] = "gptq"
    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    damp: float = Field(0.01, gt=0.0, le=1.0)
    block_size: int = Field(128, ge=1)
    clip_search: bool = False
    min_tokens: int = Field(64, ge=0)
    expert_calibration: Literal["routed", "augmented", "all"] = "augmented"
    hessian_weighting: Literal["none", "router"] = "none"
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        _check_group(value)
        return value

    def rule_for(self, module: str) -> tuple[int, Rule] | None:
        """The first rule whose pattern matches ``module`` in full, with its index."""
        for i, rule in enumerate(self.rules):
            if re.fullmatch(rule.match, module):
                return i, rule
        return None

    def spec_for(self, module: str, method_override: str | None = None) -> QuantSpec | None:
        """The :class:`QuantSpec` for ``module``, or ``None`` to keep it 16-bit."""
        found = self.rule_for(module)
        if found is None or found[1].bits == KEEP_BITS:
            return None
        rule = found[1]
        return QuantSpec(
            bits=rule.bits,
            group_size=self.group_size if rule.group_size is None else rule.group_size,
            sym=self.sym if rule.sym is None else rule.sym,
            method=method_override or rule.method or self.method,
            act_order=self.act_order,
            damp=self.damp,
            block_size=self.block_size,
            clip_grid=CLIP_GRID if self.clip_search else 0,
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=False), sort_keys=False)


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("moequant.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(ref: str | Path) -> Recipe:
    """A recipe from a built-in name (e.g. ``mixtral-a4e3``) or a YAML file path."""
    ref_text = str(ref)
    path = Path(ref_text).expanduser()
    if path.is_file():
        return parse_recipe(_read_text(path), source=str(path))
    if ref_text in builtin_names():
        text = resources.files("moequant.recipes").joinpath(f"{ref_text}.yaml").read_text()
        return parse_recipe(text, source=f"built-in recipe {ref_text}")
    if ref_text.endswith((".yaml", ".yml")) or "/" in ref_text:
        raise MoequantError(f"recipe file {ref_text} does not exist")
    raise MoequantError(f"unknown recipe {ref_text!r}; built-in recipes: {', '.join(builtin_names())}, or a YAML path")


def _read_text(path: Path) -> str:
    """A recipe file's text, refusing files that cannot be read or are not UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MoequantError(f"cannot read recipe file {path} ({exc.strerror or exc})") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoequantError(f"recipe file {path} is not UTF-8 text (byte {exc.start}); pass a YAML recipe") from exc


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """The :class:`Recipe` that the YAML ``text`` describes; any fault is one line naming ``source``."""
    if not isinstance(text, str):
        raise MoequantError(f"{source}: a recipe is YAML text, got {type(text).__name__}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MoequantError(f"{source}: not valid YAML ({first_line(exc)})") from exc
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # from YAML's value constructors
        raise MoequantError(f"{source}: YAML that holds an unreadable value ({first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise MoequantError(f"{source}: expected a mapping with name, rules and settings, got "
                            f"{type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        where = where if len(where) <= 80 else where[:77] + "..."
        raise MoequantError(" ".join(f"{source}: {where}: {_describe(err)}".split())) from exc


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: dict) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key; allowed keys are " + ", ".join(
            Rule.model_fields if "rules" in err["loc"] else Recipe.model_fields
        )
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"must be one of {expected} (got {_short(got)})"
    if kind == "missing":
        return "required"
    message = err["msg"].removeprefix("Value error, ")
    return f"{message} (got {_short(got)})"
