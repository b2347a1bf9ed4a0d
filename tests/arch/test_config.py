"""config.json is read into a MoEConfig once; each bad field is refused in one line that names it."""

import json

import pytest

from moequant.arch.mixtral import parse_mixtral_config
from moequant.arch.registry import adapter_for
from moequant.errors import MoequantError
from tests.conftest import TINY


def tiny_config(**changes) -> dict:
    """config.json of the tiny test Mixtral as transformers writes it, with ``changes`` applied."""
    from transformers import MixtralConfig

    raw = json.loads(MixtralConfig(**TINY).to_json_string())
    raw.update(changes)
    return raw


def without(key: str) -> dict:
    raw = tiny_config()
    raw.pop(key, None)
    return raw


def test_the_tiny_config_parses():
    c = parse_mixtral_config(tiny_config())
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts, c.top_k) == (128, 4, 2, 32, 4, 2)
    assert c.sliding_window is None and c.rope_type == "default"


@pytest.mark.parametrize("raw,needle", [
    (without("hidden_size"), "field hidden_size is missing; it must be a positive integer"),
    (tiny_config(hidden_size=None), "field hidden_size is null; it must be a positive integer"),
    (tiny_config(hidden_size=2.5), "field hidden_size is 2.5; it must be a positive integer"),
    (tiny_config(hidden_size=128.0), "field hidden_size is 128.0; it must be a positive integer"),
    (tiny_config(intermediate_size="256"), "field intermediate_size is '256'; it must be a positive integer"),
    (tiny_config(num_local_experts=True), "field num_local_experts is true; it must be a positive integer"),
    (tiny_config(num_hidden_layers=0), "field num_hidden_layers is 0; it must be a positive integer"),
    (tiny_config(vocab_size=-5), "field vocab_size is -5; it must be a positive integer"),
    (tiny_config(num_experts_per_tok=0), "field num_experts_per_tok is 0; it must be a positive integer"),
    (tiny_config(num_experts_per_tok=5), "num_experts_per_tok is 5, more than the 4 experts of num_local_experts"),
    (tiny_config(num_attention_heads=4, num_key_value_heads=3), "num_attention_heads is 4, not a multiple of "
                                                                "num_key_value_heads 3"),
    (tiny_config(num_key_value_heads=[2]), "field num_key_value_heads is a JSON list; it must be a positive integer"),
    (tiny_config(max_position_embeddings=0), "field max_position_embeddings is 0; it must be a positive integer"),
    (tiny_config(rms_norm_eps=0), "field rms_norm_eps is 0; it must be a positive number"),
    (tiny_config(rms_norm_eps=-1e-5), "field rms_norm_eps is -1e-05; it must be a positive number"),
    (tiny_config(rms_norm_eps="1e-5"), "field rms_norm_eps is '1e-5'; it must be a positive number"),
    (tiny_config(sliding_window="4096"), "field sliding_window is '4096'; it must be a positive number of tokens"),
    (tiny_config(sliding_window=0), "field sliding_window is 0; it must be a positive number of tokens"),
    (tiny_config(rope_parameters="rope"), "field rope_parameters is 'rope'; it must be a JSON object (or null)"),
    (tiny_config(rope_parameters=[1e6]), "field rope_parameters is a JSON list; it must be a JSON object"),
    (tiny_config(rope_scaling=2.0), "field rope_scaling is 2.0; it must be a JSON object (or null)"),
    (tiny_config(rope_parameters={"rope_theta": "big", "rope_type": "default"}),
     "field rope_parameters.rope_theta is 'big'; it must be a positive number"),
    (tiny_config(rope_parameters={"rope_theta": 1e6, "rope_type": 3}),
     "field rope_parameters.rope_type is 3; it must be a string"),
    (tiny_config(tie_word_embeddings="no"), "field tie_word_embeddings is 'no'; it must be true or false"),
    (tiny_config(head_dim=0), "field head_dim is 0; it must be a positive integer"),
    (tiny_config(head_dim=33), "heads of width 33"),
    (tiny_config(hidden_size=2, head_dim=None), "hidden_size is 2, fewer than the 4 of num_attention_heads"),
    (tiny_config(hidden_act="gelu"), "field hidden_act is 'gelu'; Mixtral experts compute silu"),
    (tiny_config(architectures="MixtralForCausalLM"), "field architectures is 'MixtralForCausalLM'; it must be a list"),
    (tiny_config(model_type=7), "field model_type is 7; it must be a string"),
    (tiny_config(rms_norm_eps=1), "transformers refuses config.json: Validation error for field 'rms_norm_eps': "
                                  "TypeError: Field 'rms_norm_eps' expected float, got int"),
    (tiny_config(rope_parameters={"rope_type": "linear", "rope_theta": 1e6}),
     "transformers refuses config.json: Missing required keys in `rope_parameters` for 'rope_type'='linear'"),
])
def test_bad_field_is_named_in_one_line(raw, needle):
    with pytest.raises(MoequantError) as info:
        adapter_for(raw)
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_long_values_are_shortened_to_one_line():
    with pytest.raises(MoequantError) as info:
        adapter_for(tiny_config(hidden_size="x\n" * 100))
    message = str(info.value)
    assert "\n" not in message and len(message) < 200, message


@pytest.mark.parametrize("field", ["head_dim", "sliding_window", "rope_scaling", "rope_parameters", "model_type"])
def test_fields_transformers_lets_be_null_take_their_default(field):
    c = parse_mixtral_config(tiny_config(**{field: None}))
    assert c == parse_mixtral_config(without(field))


@pytest.mark.parametrize("field", ["num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                                   "max_position_embeddings", "hidden_act"])
def test_null_is_refused_where_transformers_refuses_it(field):
    # transformers' MixtralConfig refuses null for these even though each has a default when absent
    parse_mixtral_config(without(field))
    with pytest.raises(MoequantError, match=f"config.json field {field} is null; it must be"):
        parse_mixtral_config(tiny_config(**{field: None}))


def test_old_style_rope_fields_are_checked_too():
    raw = tiny_config(rope_theta="1e6")
    del raw["rope_parameters"]
    with pytest.raises(MoequantError, match="field rope_theta is '1e6'; it must be a positive number"):
        parse_mixtral_config(raw)
    raw = tiny_config(rope_scaling={"type": "linear", "factor": 2.0}, rope_parameters=None, rope_theta=5e5)
    c = parse_mixtral_config(raw)
    assert (c.rope_type, c.rope_theta) == ("linear", 5e5)
