import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moequant.arch.mixtral import MixtralAdapter
from moequant.compression import plan
from moequant.errors import MoequantError
from moequant.recipe import Recipe, builtin_names, load_recipe, parse_recipe
from moequant.sizes import MIXTRAL_8X7B, estimate_bits

BASE = """
name: t
rules:
  - match: '.*\\.self_attn\\.(q|k|v|o)_proj'
    bits: 4
  - match: '.*experts\\.\\d+\\.w[123]'
    bits: 3
"""


def test_builtins_load_and_first_match_wins():
    assert {"a4e3", "a4e2", "a4e4", "a8e4"} <= set(builtin_names())
    r = load_recipe("a4e2")
    infos = {i.name: i for i in MixtralAdapter(MIXTRAL_8X7B).layer_linears(3)}
    expert = r.spec_for(infos["model.layers.3.block_sparse_moe.experts.7.w2"])
    attn = r.spec_for(infos["model.layers.3.self_attn.k_proj"])
    assert (expert.bits, expert.group_size, attn.bits, attn.group_size) == (2, 64, 4, 128)
    assert r.spec_for(infos["model.layers.3.block_sparse_moe.gate"]) is None
    assert r.spec_for("lm_head") is None
    assert r.spec_for(infos["model.layers.3.self_attn.q_proj"], "rtn").method == "rtn"
    # a bare name carries no kind: only name rules can take it
    assert r.spec_for("model.layers.3.self_attn.k_proj") is None


def test_rules_by_kind_and_role():
    r = parse_recipe("name: k\nrules:\n  - kind: expert\n    role: down\n    bits: 4\n"
                     "  - kind: expert\n    match: '.*experts\\.0\\..*'\n    bits: 8\n  - kind: expert\n    bits: 2\n")
    infos = {i.name: i for i in MixtralAdapter(MIXTRAL_8X7B).layer_linears(0)}
    bits = {n: (s.bits if (s := r.spec_for(i)) else 16) for n, i in infos.items()}
    assert bits["model.layers.0.block_sparse_moe.experts.3.w2"] == 4
    assert bits["model.layers.0.block_sparse_moe.experts.0.w1"] == 8
    assert bits["model.layers.0.block_sparse_moe.experts.3.w3"] == 2
    assert bits["model.layers.0.self_attn.q_proj"] == 16
    with pytest.raises(MoequantError, match=r"rules\[0\]: .*needs kind, role, match or modules"):
        parse_recipe("name: k\nrules:\n  - bits: 4\n")


def test_rule_overrides_and_keep():
    r = parse_recipe(BASE + "  - match: 'lm_head'\n    bits: 8\n    sym: false\n    method: rtn\n")
    s = r.spec_for("lm_head")
    assert (s.bits, s.sym, s.method) == (8, False, "rtn")
    keep = parse_recipe("name: k\nrules:\n  - match: '.*q_proj'\n    bits: 16\n  - match: '.*'\n    bits: 4\n")
    assert keep.spec_for("model.layers.0.self_attn.q_proj") is None
    assert keep.spec_for("model.layers.0.self_attn.k_proj").bits == 4


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE.replace("bits: 3", "bits: 5"), r"rules\[1\]\.bits: must be one of 2, 3, 4, 8 or 16 \(got 5\)"),
        (BASE + "colour: blue\n", r"colour: unknown key; allowed keys are name,"),
        (BASE.replace("bits: 4", "bits: 4\n    groupsize: 64"), r"rules\[0\]\.groupsize: unknown key"),
        ("name: t\ngroup_size: 100\n", r"group_size: must be -1 .* multiple of 32 \(got 100\)"),
        ("name: t\nmethod: awq\n", r"method: must be one of .gptq. or .rtn."),
        ("rules: []\n", r"name: required"),
        ("name: t\nrules:\n  - match: '('\n    bits: 4\n", r"not a valid regular expression"),
        ("- a\n- b\n", r"expected a mapping"),
        ("name: t\nrules: 4\n", r"rules: .*valid list"),
        ("name: t\nrules:\n  - 4\n", r"rules\[0\]: .*dictionary"),
        ("name: t\nrules:\n  - match: 'a{99999999999}'\n    bits: 4\n", r"not a valid regular expression"),
        ("name: t\nwhen: 2001-13-45\n", r"YAML that holds an unreadable value"),
        ("name: t\n\x00\n", r"not valid YAML"),
        ("name: [unclosed\n", r"not valid YAML"),
    ],
)
def test_invalid_recipes_name_file_field_and_allowed(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MoequantError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "name: caf\u00e9".encode("latin-1")])
def test_a_recipe_file_that_is_not_utf8_text_is_one_line(tmp_path, data):
    path = tmp_path / "binary.yaml"
    path.write_bytes(data)
    with pytest.raises(MoequantError, match="is not UTF-8 text") as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(MoequantError, match="built-in recipes: .*a4e3"):
        load_recipe("mixtral-a1e1")


def test_plan_refuses_router_and_keeps_uneven_groups():
    adapter = MixtralAdapter(MIXTRAL_8X7B)
    router = parse_recipe("name: r\nrules:\n  - match: '.*block_sparse_moe\\..*'\n    bits: 4\n")
    with pytest.raises(MoequantError, match="would quantise the router"):
        plan(adapter, router)
    group = parse_recipe("name: g\nrules:\n  - match: '.*w2'\n    bits: 4\n    group_size: 4096\n")
    # 14336 inputs: three groups of 4096 and a last one of 2048
    assert plan(adapter, group)["model.layers.0.block_sparse_moe.experts.0.w2"].group_size == 4096
    embed = parse_recipe("name: e\nrules:\n  - match: 'model.embed_tokens'\n    bits: 4\n")
    with pytest.raises(MoequantError, match="embeddings stay 16-bit"):
        plan(adapter, embed)


def test_size_estimates_follow_the_bits():
    est = {n: estimate_bits(load_recipe(n), MIXTRAL_8X7B) for n in builtin_names()}
    assert est["a4e2"]["bits_per_weight"] < est["a4e3"]["bits_per_weight"]
    assert est["a4e3"]["bits_per_weight"] < est["a4e4"]["bits_per_weight"]
    assert est["a4e4"]["bits_per_weight"] < est["a8e4"]["bits_per_weight"]
    # Mixtral-8x7B has 46.7B parameters; 4-bit g128 is about 4.2 bits per weight with 16-bit embeddings
    assert 46.5e9 < est["a4e4"]["parameters"] < 46.8e9
    assert 4.1 < est["a4e4"]["bits_per_weight"] < 4.4


def test_a_group_wider_than_the_input_is_one_group():
    adapter = MixtralAdapter({**MIXTRAL_8X7B, "hidden_size": 64, "intermediate_size": 256, "head_dim": 16})
    specs = plan(adapter, load_recipe("a4e3"))
    assert specs["model.layers.0.self_attn.q_proj"].group_size == -1  # 64 inputs, groups of 128
    assert specs["model.layers.0.block_sparse_moe.experts.0.w1"].group_size == -1
    assert specs["model.layers.0.block_sparse_moe.experts.0.w2"].group_size == 128  # 256 inputs


# -- any document: a valid Recipe or one line --------------------------------------------------
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from([".*", "(", "a{99999999999}", "[z-a]", "-1", "1e400"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_RULE_KEYS = ["match", "bits", "group_size", "sym", "method"]
_RECIPE_KEYS = ["name", "description", "method", "group_size", "sym", "act_order", "damp", "block_size",
                "clip_search", "min_tokens", "expert_calibration", "hessian_weighting", "rules"]


@st.composite
def _rule(draw) -> dict:
    rule = {"match": draw(st.sampled_from([".*", r".*\.w[123]", "(", "[", "a{99999999999}", "lm_head"])),
            "bits": draw(st.sampled_from([2, 3, 4, 8, 16, 0, 5, 32, -4, "4", 4.0, None]))}
    for key in draw(st.lists(st.sampled_from(_RULE_KEYS + ["groupsize", "extra"]), max_size=3)):
        rule[key] = draw(_VALUES)
    if draw(st.booleans()):
        rule.pop(draw(st.sampled_from(["match", "bits"])), None)
    return rule


@st.composite
def _recipe_document(draw) -> str | bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    doc: dict = {"name": draw(st.sampled_from(["t", "", 7, None])), "rules": draw(st.lists(_rule(), max_size=4))}
    for key in draw(st.lists(st.sampled_from(_RECIPE_KEYS + ["colour", "bits"]), max_size=4)):
        doc[key] = draw(_VALUES)
    if draw(st.booleans()):
        doc["rules"] = draw(_VALUES)
    text = yaml.safe_dump(doc, allow_unicode=True)
    cut = draw(st.integers(0, len(text)))
    return text if draw(st.booleans()) else text[:cut]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_recipe_document())
def test_any_recipe_document_is_a_recipe_or_one_line(tmp_path_factory, document):
    path = tmp_path_factory.getbasetemp() / "fuzzed-recipe.yaml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document, encoding="utf-8")
    try:
        recipe = load_recipe(path)
    except MoequantError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 400, message
        return
    assert isinstance(recipe, Recipe)
    for rule in recipe.rules:
        re.compile(rule.match)


def test_rules_listing_modules_by_name():
    r = parse_recipe("name: p\nrules:\n  - modules: [model.layers.0.self_attn.q_proj, model.layers.1.self_attn.k_proj]\n"
                     "    bits: 8\n  - kind: attention\n    bits: 4\n")
    assert r.spec_for("model.layers.0.self_attn.q_proj").bits == 8
    assert r.spec_for("model.layers.0.self_attn.k_proj") is None  # a bare name has no kind for the kind rule
    assert parse_recipe(r.to_yaml()) == r
    assert r.rules[0].describe() == "modules: 2 listed"
