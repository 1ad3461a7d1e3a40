import pytest
from transformers import AutoConfig

from modeling_mta import MTAConfig

from .tiny import TINY


def test_defaults_are_the_paper_recipe():
    config = MTAConfig(**{**TINY, "num_hidden_layers": 12})
    assert config.model_type == "mta"
    assert config.mta_layers == [2, 6, 10]
    assert config.kq_conv_size == [6, 11]
    assert config.kq_conv_post_size is None
    assert config.key_padding == "both"
    assert config.head_mix_size is None
    assert config.head_mix_post_size == 2
    assert config.group_norm is True and config.group_norm_depth_scaling is True
    assert config.attn_gate is None
    assert config.mta_init == "identity"
    # Every Llama field is there too.
    assert config.num_key_value_heads == 2 and config.head_dim == 8 and config.rms_norm_eps == 1e-6


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(kq_conv_size=[6, 10]), ["kq_conv_size", "odd", "both"]),
        (dict(kq_conv_post_size=[3, 4]), ["kq_conv_post_size", "odd"]),
        (dict(head_mix_size=3), ["head_mix_size", "num_attention_heads=4", "[1, 2, 4]"]),
        (dict(head_mix_post_size=8), ["head_mix_post_size", "[1, 2, 4]"]),
        (dict(mta_layers=[0, 3]), ["mta_layers", "[3]", "0..2"]),
        (dict(mta_layers=[-1]), ["mta_layers", "0..2"]),
        (dict(mta_layers=[1, 1]), ["mta_layers", "duplicates"]),
        (dict(key_padding="center"), ["key_padding", "both", "left", "right"]),
        (dict(attn_gate="sigmoid"), ["attn_gate", "scalar", "vector"]),
        (dict(mta_init="random"), ["mta_init", "identity"]),
        (dict(kq_conv_size=[0, 3]), ["kq_conv_size", "1..64"]),
        (dict(kq_conv_size=[6, 65]), ["kq_conv_size", "1..64"]),
        (dict(kq_conv_size=[6]), ["kq_conv_size", "[c_q, c_k]"]),
        (dict(head_mix_size=0), ["head_mix_size", "positive"]),
        (dict(head_mix_post_size=-2), ["head_mix_post_size", "positive"]),
    ],
)
def test_invalid_fields_raise_value_errors_naming_them(overrides, words):
    with pytest.raises(ValueError) as error:
        MTAConfig(**{**TINY, **overrides})
    for word in words:
        assert word in str(error.value)


def test_even_key_size_is_fine_with_one_sided_padding():
    for padding in ("left", "right"):
        assert MTAConfig(**TINY, kq_conv_size=[6, 10], key_padding=padding).kq_conv_size == [6, 10]


def test_tuples_are_stored_as_lists():
    config = MTAConfig(**TINY, kq_conv_size=(2, 3), mta_layers=(0, 1))
    assert config.kq_conv_size == [2, 3] and config.mta_layers == [0, 1]


def test_full_head_mixing_is_allowed():
    assert MTAConfig(**TINY, head_mix_size=4, head_mix_post_size=4).head_mix_size == 4


def without_path(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k != "_name_or_path"}


def test_round_trip_through_save_load_and_to_dict(tmp_path):
    config = MTAConfig(
        **TINY,
        mta_layers=[1],
        kq_conv_size=[3, 5],
        kq_conv_post_size=[2, 4],
        key_padding="left",
        head_mix_size=4,
        head_mix_post_size=1,
        group_norm=False,
        attn_gate="vector",
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MTAConfig
    assert without_path(loaded.to_dict()) == without_path(config.to_dict())
    assert MTAConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    for field in ("mta_layers", "kq_conv_size", "kq_conv_post_size", "key_padding", "head_mix_size",
                  "head_mix_post_size", "group_norm", "attn_gate", "rope_parameters"):
        assert getattr(loaded, field) == getattr(config, field), field
