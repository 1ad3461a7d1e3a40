"""MTAForCausalLM: identity equals Llama, causality, padding, gradients, dtypes, attention maps."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_mta import MTAForCausalLM, group_norm_triton
from modeling_mta.modeling_mta import MTA_MODULE_NAMES, AttentionLayout, MTAGroupNorm, is_mta_parameter
from modeling_mta.mta_reference import group_norm, mta_attention

from .tiny import OP_COMBOS, TINY, combo_id, mta_config, random_mta_model, randomize_mta

ALL_IDENTITY_OPS = dict(kq_conv_size=[3, 5], kq_conv_post_size=[2, 3], head_mix_size=2, head_mix_post_size=4,
                        group_norm=False, attn_gate=None)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("key_padding", ["both", "left", "right"])
def test_identity_mta_gives_the_llama_logits(kv_heads, tied, key_padding):
    fields = {**TINY, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied}
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    mta = MTAForCausalLM(mta_config(**fields, **ALL_IDENTITY_OPS, key_padding=key_padding)).eval()
    missing, unexpected = mta.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and missing and all(is_mta_parameter(name) for name in missing)
    if tied:
        assert mta.lm_head.weight.data_ptr() == mta.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, TINY["vocab_size"], (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = llama(ids, **kwargs).logits
            got = mta(ids, **kwargs).logits
            rows = slice(None) if not kwargs else (slice(None), slice(5, None))  # Llama's padding rows are not defined
            assert (expected[rows] - got[rows]).abs().max() <= 1e-5


def test_random_mta_parameters_change_the_logits():
    ids = torch.randint(0, TINY["vocab_size"], (1, 16))
    model = MTAForCausalLM(mta_config(**ALL_IDENTITY_OPS)).eval()
    with torch.no_grad():
        before = model(ids).logits
        randomize_mta(model)
        after = model(ids).logits
    assert (before - after).abs().max() > 1e-2


@pytest.mark.parametrize("combo", OP_COMBOS, ids=combo_id)
def test_changing_a_token_never_changes_earlier_logits(combo):
    model = random_mta_model(**combo)
    ids = torch.randint(0, TINY["vocab_size"], (1, 14))
    with torch.no_grad():
        base = model(ids).logits
        for t in (3, 8, 13):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % TINY["vocab_size"]
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert (logits[:, t] - base[:, t]).abs().max() > 1e-4


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("combo", OP_COMBOS[::3] + OP_COMBOS[-1:], ids=combo_id)
def test_padded_rows_give_the_logits_of_the_sequence_alone(combo):
    model = random_mta_model(**combo)
    short = torch.randint(1, TINY["vocab_size"], (1, 9))
    long = torch.randint(1, TINY["vocab_size"], (1, 13))
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([torch.cat([pad, short], 1), long, torch.cat([short, pad], 1)])  # left, none, right padding
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        alone_short = model(short).logits[0]
        alone_long = model(long).logits[0]
    torch.testing.assert_close(batch[0, 4:], alone_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1], alone_long, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[2, :9], alone_short, atol=1e-5, rtol=0)
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("combo", OP_COMBOS[1::3] + OP_COMBOS[-1:], ids=combo_id)
def test_packed_documents_give_the_logits_of_each_document_alone(combo):
    # What transformers' DataCollatorWithFlattening produces: one row, position ids restarting per document.
    model = random_mta_model(**combo)
    documents = [torch.randint(0, TINY["vocab_size"], (1, n)) for n in (7, 1, 11, 5)]
    packed = torch.cat(documents, 1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in documents])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids).logits
        alone = torch.cat([model(d).logits for d in documents], 1)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    second_row = torch.cat([documents[2], documents[0]], 1)  # rows of a batch are split independently
    with torch.no_grad():
        both = model(torch.cat([packed[:, :18], second_row], 0),
                     position_ids=torch.cat([position_ids[:, :18], torch.cat([torch.arange(11), torch.arange(7)])[None]])).logits
    torch.testing.assert_close(both[1], torch.cat([alone[0, 8:19], alone[0, :7]]), atol=1e-5, rtol=0)


def test_reference_core_gradients_match_finite_differences():
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    q = torch.randn(1, 4, 6, 3, **f64)
    k = torch.randn(1, 2, 6, 3, **f64)
    v = torch.randn(1, 2, 6, 3, **f64)
    visible = torch.ones(6, 6).tril().bool()
    visible[:, 0] = False  # token 0 is padding
    visible[0, :] = False
    weights = [
        torch.randn(4, 1, 3, 3, **f64),  # pre-softmax kq conv
        torch.randn(4, 1, 2, 3, **f64),  # post-softmax kq conv
        torch.randn(2, 2, 2, **f64),  # pre-softmax head mix
        torch.randn(1, 4, 4, **f64),  # post-softmax full head mix
    ]
    inputs = [t.requires_grad_() for t in (q, k, v, *weights)]

    for padding in ("both", "left", "right"):
        def core(q, k, v, pre, post, mix, mix_post):
            out, _ = mta_attention(q, k, v, visible, pre, post, mix, mix_post, key_padding=padding)
            return out

        assert torch.autograd.gradcheck(core, inputs, eps=1e-6, atol=1e-5)


def test_attention_layer_gradients_match_finite_differences():
    # The whole attention layer in float64 (the decoder's Llama RMSNorm computes in float32, so the
    # layer is checked on its own): every MTA parameter, the projections and the input.
    combo = dict(kq_conv_size=[2, 3], kq_conv_post_size=[2, 3], head_mix_size=2, head_mix_post_size=2,
                 group_norm=True, attn_gate="vector")
    model = random_mta_model(dtype=torch.float64, **combo)
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 5, TINY["hidden_size"], dtype=torch.float64, requires_grad=True)
    rope = model.model.rotary_emb(hidden, position_ids=torch.arange(5)[None])
    layout = AttentionLayout(None, 1, 5, 0, 0, hidden.device)
    params = dict(attn.named_parameters())
    names = [n for n in params if n.split(".")[0] in MTA_MODULE_NAMES or n.startswith(("q_proj", "k_proj"))]
    assert {n.split(".")[0] for n in names} == set(MTA_MODULE_NAMES) | {"q_proj", "k_proj"}

    def layer(hidden, *values):
        out, _ = torch.func.functional_call(attn, {**params, **dict(zip(names, values))}, (hidden, rope, layout))
        return out

    values = [params[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(layer, [hidden, *values], eps=1e-6, atol=1e-5)


def test_output_attentions_returns_each_layers_final_map():
    model = random_mta_model(kq_conv_post_size=None, head_mix_post_size=None)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    assert len(out.attentions) == TINY["num_hidden_layers"]
    for probs in out.attentions:
        assert probs.shape == (2, 4, 7, 7)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7))
        assert (probs.triu(1) == 0).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = random_mta_model(kq_conv_post_size=[2, 3], attn_gate="scalar").train()
        if checkpointing:
            # transformers 5.2x renamed the method; 5.17 has only the old name.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        ids = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
        model(ids, labels=ids).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in backward
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_float32(dtype):
    combo = dict(kq_conv_post_size=[2, 3], head_mix_size=2, attn_gate="vector")
    reference = random_mta_model(**combo)
    model = random_mta_model(dtype=dtype, **combo)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    error = (got.float() - expected).norm() / expected.norm()
    assert error < 3e-2


def test_explicit_position_ids_are_used():
    model = random_mta_model()
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        default = model(ids).logits
        same = model(ids, position_ids=torch.arange(8)[None]).logits
        other = model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 10, 11, 12, 13]])).logits
    torch.testing.assert_close(same, default, atol=0, rtol=0)
    torch.testing.assert_close(other[:, :4], default[:, :4])
    assert (other[:, 4:] - default[:, 4:]).abs().max() > 1e-4


def test_scalar_and_vector_gates_scale_by_sigmoid_of_their_bias_when_weights_are_zero():
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    base = random_mta_model(mta_layers=[], group_norm=False, attn_gate=None)
    attn = base.model.layers[0].self_attn
    for gate in ("scalar", "vector"):
        gated = random_mta_model(mta_layers=[], group_norm=False, attn_gate=gate)
        gated.load_state_dict(base.state_dict(), strict=False)
        module = gated.model.layers[0].self_attn.gate
        with torch.no_grad():
            module.weight.zero_()
            module.bias.copy_(torch.linspace(-1.0, 2.0, module.bias.numel()))
            # Expected: the ungated layer with o_proj's input channels scaled by sigmoid(bias), per head.
            scale = torch.sigmoid(module.bias).expand(TINY["num_attention_heads"], attn.head_dim).reshape(-1)
            captured = {}
            gated.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: captured.update(gated=i[0]))
            hook = attn.o_proj.register_forward_hook(lambda m, i, o: captured.update(plain=i[0]))
            base(ids)
            gated(ids)
            hook.remove()
        torch.testing.assert_close(captured["gated"], captured["plain"] * scale)


def test_bad_inputs_give_clear_errors():
    model = random_mta_model()
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_the_group_norm_kernels_are_a_well_formed_custom_op():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 5, 16, device=device).transpose(1, 2).requires_grad_()  # as the attention hands it over
    weight = (torch.rand(16, device=device) + 0.5).requires_grad_()
    torch.library.opcheck(group_norm_triton._group_norm_op, (x, weight))
    y, rstd = group_norm_triton._group_norm_op(x, weight)
    torch.library.opcheck(group_norm_triton._group_norm_backward_op,
                          (torch.randn_like(y), x.detach(), weight.detach(), rstd))
    with pytest.raises(ValueError, match=r"takes x \(B, N, H, d\) and weight \(d,\), got \(30, 16\)"):
        group_norm_triton.group_norm_fused(x.reshape(30, 16), weight)
    with pytest.raises(ValueError, match=r"got \(2, 5, 3, 16\) and \(8,\)"):
        group_norm_triton.group_norm_fused(x, weight[:8])


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("head_dim", [16, 24, 256])
def test_the_group_norm_module_computes_the_reference_group_norm(fused, head_dim):
    # The module runs torch's RMSNorm or the Triton kernels; the reference function is the definition. Transposed
    # input, as the attention hands it over (B, N, H, d), random weights, depth scaling on, a head_dim that is not a
    # power of two (the kernels' blocks are) and one with fewer tokens per block. Values and gradients in float64.
    device = "cuda" if fused and torch.cuda.is_available() else "cpu"  # (else Triton's interpreter)
    module = MTAGroupNorm(head_dim, layer_idx=3, depth_scaling=True).double().to(device)
    torch.nn.init.normal_(module.weight, 1.0, 0.3)
    x = torch.randn(2, 4, 37, head_dim, dtype=torch.float64, device=device).transpose(1, 2).requires_grad_()
    got = module(x, fused=fused)
    want = group_norm(x, module.weight, module.scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, module.weight), grad),
                               torch.autograd.grad(want, (x, module.weight), grad), rtol=1e-10, atol=1e-10)
    # Half precision under autocast: the module rounds the product to bf16, the reference multiplies the bf16 normed
    # values by the float32 weight; within bf16's rounding. Twice that where one more rounding enters: torch's RMSNorm
    # rounds the scaled weight to bf16 too, and Triton's interpreter rounds float32 to bf16 toward zero (the GPU to
    # nearest).
    module = module.float()
    x = x.detach().bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        got = module(x, fused=fused)
        want = group_norm(x, module.weight, module.scale)
    assert got.dtype == torch.bfloat16
    rtol = 2 ** -7 if fused and device == "cuda" else 2 ** -6
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-3)
