"""mta.model_card: the README.md of a Hub-ready folder says the recipe, the layers, the base model, how to load."""

from mta.model_card import model_card
from mta.text_data import ByteTokens

from .tiny import mta_config
from .trainer_helpers import ALL_MTA_OPS


def test_the_card_describes_every_mta_operation_and_where_it_acts():
    card = model_card(mta_config(**ALL_MTA_OPS), base_model="meta-llama/Llama-3.2-1B", tokenizer="llama-folder",
                      training=["- trained somehow"], repo_id="me/model")
    assert "- Key-query convolutions (pre-softmax 3 x 5, post-softmax 2 x 3; queries x keys) in layers 0, 2" in card
    assert ("- In every layer: pre-softmax head mixing in groups of 2; post-softmax head mixing in groups of 4; "
            "group norm with depth scaling; scalar output gate.") in card
    assert "| `kq_conv_post_size` | `[2, 3]` |" in card and "| `attn_gate` | `scalar` |" in card
    assert "base_model: meta-llama/Llama-3.2-1B\n" in card.split("---")[1]  # Hub metadata
    assert "- trained somehow" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/model", trust_remote_code=True)' in card
    assert 'AutoTokenizer.from_pretrained("me/model")' in card and "adapter" not in card


def test_a_local_base_is_named_but_not_put_in_the_metadata():
    card = model_card(mta_config(mta_layers=[], head_mix_post_size=None, group_norm=False), base_model="/data/llama",
                      tokenizer=ByteTokens.name, training=[], has_adapter=True)
    assert "base_model:" not in card and "/data/llama" in card
    assert "- No key-query convolution." in card and "In every layer" not in card
    assert "UTF-8 bytes of the text" in card
    assert 'PeftModel.from_pretrained(base_mta_model, "path/to/this/folder", subfolder="adapter")' in card
