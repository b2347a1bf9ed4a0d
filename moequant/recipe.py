"""Recipes: which modules get which bits (rules), and the algorithm settings (how).

A recipe is YAML::

    name: a4e3
    method: gptq            # default solver for rules that do not say: gptq | rtn
    group_size: 128
    sym: true
    act_order: true
    damp: 0.01
    rules:                  # first match wins
      - kind: attention     # what a module is: attention | expert | shared_expert | dense_mlp | lm_head
        bits: 4
      - kind: expert
        role: down          # and its role: q | k | v | o (attention), gate | up | down (MLPs)
        bits: 4
      - match: '.*\\.block_sparse_moe\\.experts\\.\\d+\\.w[13]'   # re.fullmatch on the module's name
        bits: 3
      - modules: [model.layers.0.self_attn.q_proj]  # these modules by name (as ``moequant plan`` writes)
        bits: 8

A rule selects by ``kind``, ``role``, ``match`` and ``modules`` together (each that it gives must hold), so
recipes by kind mean the same on every family. Modules no rule matches stay 16-bit. Routers and
norms are never quantised; embeddings and lm_head only when a rule names them.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from moequant.arch.base import LinearInfo
from moequant.errors import MoequantError, first_line
from moequant.quant.types import QuantSpec

CLIP_GRID = 20  # shrink factors 1.00, 0.98, ..., 0.62 of each group's range
KEEP_BITS = 16


_MLP_ROLES = {"w1": "gate", "w3": "up", "w2": "down"}


class Rule(BaseModel):
    """Which modules a setting applies to (by kind, role and name pattern), with optional overrides."""

    model_config = ConfigDict(extra="forbid")

    match: str | None = None
    kind: Literal["attention", "expert", "shared_expert", "dense_mlp", "lm_head"] | None = None
    role: Literal["q", "k", "v", "o", "gate", "up", "down"] | None = None
    modules: list[str] | None = None
    bits: Literal[2, 3, 4, 8, 16]
    group_size: int | None = None
    sym: bool | None = None
    method: Literal["gptq", "rtn"] | None = None
    _names: frozenset[str] | None = PrivateAttr(default=None)

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            re.compile(value)
        except (re.error, OverflowError, RecursionError) as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        return _check_group(value)

    @model_validator(mode="after")
    def _selects(self) -> Rule:
        if self.match is None and self.kind is None and self.role is None and self.modules is None:
            raise ValueError("a rule needs kind, role, match or modules to say which modules it takes")
        self._names = None if self.modules is None else frozenset(self.modules)
        return self

    def selects(self, module: LinearInfo | str) -> bool:
        """Whether this rule takes ``module`` (a name alone has no kind or role for kind/role rules)."""
        name, kind, role = (module, None, None) if isinstance(module, str) else \
            (module.name, module.kind, _recipe_role(module))
        return ((self._names is None or name in self._names)
                and (self.kind is None or self.kind == kind) and (self.role is None or self.role == role)
                and (self.match is None or re.fullmatch(self.match, name) is not None))

    def describe(self) -> str:
        listed = None if self.modules is None else f"{len(self.modules)} listed"
        return ", ".join(f"{k} {v!r}" if k != "modules" else f"modules: {v}" for k, v in (
            ("kind", self.kind), ("role", self.role), ("match", self.match), ("modules", listed)) if v is not None)


def _recipe_role(info: LinearInfo) -> str:
    if info.kind == "attention":
        return info.role
    return _MLP_ROLES.get(info.role, info.role)


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

    def rule_for(self, module: LinearInfo | str) -> tuple[int, Rule] | None:
        """The first rule that selects ``module``, with its index."""
        for i, rule in enumerate(self.rules):
            if rule.selects(module):
                return i, rule
        return None

    def spec_for(self, module: LinearInfo | str, method_override: str | None = None) -> QuantSpec | None:
        """The :class:`QuantSpec` for ``module`` (a :class:`LinearInfo`, or a bare name for name rules),
        or ``None`` to keep it 16-bit."""
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


ALIASES = {f"mixtral-{name}": name for name in ("a4e2", "a4e3", "a4e4", "a8e4")}
"""Earlier names of the built-in recipes, still accepted."""


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("moequant.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(ref: str | Path) -> Recipe:
    """A recipe from a built-in name (e.g. ``a4e3``) or a YAML file path."""
    ref_text = str(ref)
    path = Path(ref_text).expanduser()
    if path.is_file():
        return parse_recipe(_read_text(path), source=str(path))
    ref_text = ALIASES.get(ref_text, ref_text)
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
