"""Cached decoding with MTACache equals recomputing the whole sequence (issue: exact KV cache for MTA)."""

import pytest
import torch
from transformers import DynamicCache

from modeling_mta import MTACache
from modeling_mta.modeling_mta import CACHE_FIELD

from .tiny import OP_COMBOS, TINY, combo_id, random_mta_model

QUERY_CONVS = dict(kq_conv_size=[3, 3], kq_conv_post_size=[2, 5], head_mix_size=2, head_mix_post_size=4,
                   group_norm=True, attn_gate="vector")


def returned_cache(output):
    return getattr(output, CACHE_FIELD)


def decode_in_chunks(model, ids, chunks, attention_mask=None):
    """Feed `ids` through the model chunk by chunk with the cache it returns; the logits of every position."""
    cache, logits, start = None, [], 0
    for size in chunks:
        end = start + size
        mask = attention_mask[:, :end] if attention_mask is not None else None
        out = model(ids[:, start:end], attention_mask=mask, use_cache=True, **{CACHE_FIELD: cache})
        cache = returned_cache(out)
        logits.append(out.logits)
        start = end
    assert start == ids.shape[1]
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("combo", OP_COMBOS, ids=combo_id)
def test_prefill_then_30_single_tokens_equals_recomputation(combo):
    model = random_mta_model(**combo)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37))
    with torch.no_grad():
        full = model(ids).logits
        cached, cache = decode_in_chunks(model, ids, [7] + [1] * 30)
    assert isinstance(cache, MTACache) and cache.get_seq_length() == 37
    assert (cached - full).abs().max() <= 1e-5


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 3, 4], [2, 1, 6, 1, 2], [11, 1]])
def test_chunked_prefill_and_multi_token_calls(chunks):
    model = random_mta_model(**QUERY_CONVS)
    ids = torch.randint(0, TINY["vocab_size"], (3, 12))
    with torch.no_grad():
        full = model(ids).logits
        cached, _ = decode_in_chunks(model, ids, chunks)
    assert (cached - full).abs().max() <= 1e-5


def test_cache_keeps_queries_only_for_layers_that_convolve_over_queries():
    model = random_mta_model(**QUERY_CONVS)  # mta_layers = [0, 2] of 3
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    with torch.no_grad():
        cache = returned_cache(model(ids, use_cache=True))
    n = TINY["num_hidden_layers"]
    assert len(cache.layers) == n + 2  # keys/values of all layers, then queries of layers 0 and 2
    assert cache.query_slot == {0: n, 2: n + 1}
    for slot in (n, n + 1):
        assert cache.layers[slot].keys.shape == (1, TINY["num_attention_heads"], 6, 8)


@pytest.mark.parametrize("combo", [QUERY_CONVS, OP_COMBOS[5], OP_COMBOS[10]], ids=["all", "combo5", "combo10"])
def test_greedy_and_seeded_sampling_generate_the_same_with_and_without_cache(combo):
    model = random_mta_model(**combo)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 6))
    mask = torch.ones_like(prompt)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, pad_token_id=0)
    greedy = model.generate(prompt, do_sample=False, use_cache=True, **kwargs)
    assert torch.equal(greedy, model.generate(prompt, do_sample=False, use_cache=False, **kwargs))
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        samples.append(model.generate(prompt, do_sample=True, temperature=1.5, use_cache=use_cache, **kwargs))
    assert torch.equal(*samples)
    assert samples[0].shape == (2, 26)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = random_mta_model(**QUERY_CONVS)
    prompts = [torch.randint(1, TINY["vocab_size"], (n,)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=15, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[row, width:], alone[0, len(prompt) :]), row


def test_beam_search_reorders_the_query_history():
    model = random_mta_model(**QUERY_CONVS)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, num_beams=4, do_sample=False,
                  pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_returned_cache_passed_back_to_generate_continues_the_sequence():
    model = random_mta_model(**QUERY_CONVS)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 5))
    kwargs = dict(do_sample=False, pad_token_id=0)
    first = model.generate(prompt, max_new_tokens=6, return_dict_in_generate=True, **kwargs)
    cache = returned_cache(first)
    assert isinstance(cache, MTACache) and cache.get_seq_length() == 10  # the last new token is not in it yet
    continued = model.generate(first.sequences, max_new_tokens=6, **{CACHE_FIELD: cache}, **kwargs)
    assert torch.equal(continued, model.generate(prompt, max_new_tokens=12, use_cache=False, **kwargs))


def test_cropping_the_cache_crops_the_query_history():
    model = random_mta_model(**QUERY_CONVS)
    ids = torch.randint(0, TINY["vocab_size"], (1, 14))
    with torch.no_grad():
        full = model(ids).logits
        _, cache = decode_in_chunks(model, ids[:, :12], [8, 4])
        cache.crop(-4)  # what assisted decoding does with rejected candidates
        assert cache.get_seq_length() == 8
        out = model(ids[:, 8:], use_cache=True, **{CACHE_FIELD: cache})
    assert (out.logits - full[:, 8:]).abs().max() <= 1e-5


def test_a_plain_dynamic_cache_is_refused_when_queries_are_needed():
    model = random_mta_model(**QUERY_CONVS)
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with pytest.raises(TypeError, match="MTACache"):
        model(ids, use_cache=True, **{CACHE_FIELD: DynamicCache()})
    no_query_convs = random_mta_model(kq_conv_size=[1, 5], head_mix_post_size=2)
    with torch.no_grad():
        full = no_query_convs(ids).logits
        cache = DynamicCache()
        first = no_query_convs(ids[:, :3], use_cache=True, **{CACHE_FIELD: cache}).logits
        rest = no_query_convs(ids[:, 3:], use_cache=True, **{CACHE_FIELD: cache}).logits
    assert (torch.cat([first, rest], 1) - full).abs().max() <= 1e-5
