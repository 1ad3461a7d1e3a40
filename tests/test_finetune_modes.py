"""The three training modes under the Trainer: MTA only, full, LoRA with the MTA modules in `modules_to_save`."""

import pytest
import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from transformers import TrainerCallback

from conversion import convert_llama
from modeling_mta import MTAForCausalLM
from modeling_mta.modeling_mta import MTA_MODULE_NAMES, is_mta_parameter
from mta.train_modes import model_from_state_dict, prepare_for_training, present_mta_modules, LoraOptions

from .tiny import TINY, random_mta_model, tiny_llama
from .trainer_helpers import ALL_MTA_OPS, fixed_set_loss, periodic_blocks, tiny_trainer

pytestmark = pytest.mark.filterwarnings("ignore:group_norm / attn_gate are not identity")


@pytest.mark.parametrize("mode, lr, least_drop", [("mta", 5e-2, 0.02), ("full", 3e-3, 0.2), ("lora", 1e-2, 0.1)])
def test_a_few_trainer_steps_lower_the_loss(tmp_path, mode, lr, least_drop):
    ids = periodic_blocks()
    model = prepare_for_training(random_mta_model(**ALL_MTA_OPS).train(), mode)
    before = fixed_set_loss(model, ids)
    tiny_trainer(model, ids, tmp_path, lr).train()
    after = fixed_set_loss(model, ids)
    assert after < before - least_drop, (before, after)


def test_mta_mode_changes_the_mta_parameters_and_nothing_else(tmp_path):
    model = random_mta_model(**ALL_MTA_OPS).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tiny_trainer(prepare_for_training(model, "mta"), periodic_blocks(), tmp_path, 5e-2).train()
    mta_names = [name for name in before if is_mta_parameter(name)]
    assert {name.split(".")[-2] for name in mta_names} == set(MTA_MODULE_NAMES)  # every kind of MTA parameter
    for name, tensor in model.state_dict().items():
        if is_mta_parameter(name):
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed"


def test_lora_trains_the_mta_copies_and_its_adapter_reloads_onto_a_fresh_conversion(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    convert_llama(tmp_path / "llama", tmp_path / "mta", **ALL_MTA_OPS)
    model = prepare_for_training(MTAForCausalLM.from_pretrained(tmp_path / "mta"), "lora")
    assert model.peft_config["default"].modules_to_save == list(MTA_MODULE_NAMES)
    ids = periodic_blocks()
    tiny_trainer(model, ids, tmp_path / "run", 1e-2).train()
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(wrappers) == 2 * 2 + 4 * 7  # kq_conv + kq_conv_post in layers 2, 6; four modules in all 7 layers
    for wrapper in wrappers:
        for name, trained in wrapper.modules_to_save["default"].named_parameters():
            assert not torch.equal(trained, getattr(wrapper.original_module, name)), "an MTA copy did not train"
    model.eval()
    model.save_pretrained(tmp_path / "adapter")

    convert_llama(tmp_path / "llama", tmp_path / "fresh", **ALL_MTA_OPS)
    fresh = MTAForCausalLM.from_pretrained(tmp_path / "fresh")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-6, rtol=1e-5)
        # The attention reads the trained copies, not the converted identity modules.
        copies = {id(w): {n: p.clone() for n, p in w.modules_to_save["default"].named_parameters()}
                  for w in reloaded.modules() if isinstance(w, ModulesToSaveWrapper)}
        for wrapper in (w for w in reloaded.modules() if isinstance(w, ModulesToSaveWrapper)):
            wrapper.modules_to_save["default"].load_state_dict(wrapper.original_module.state_dict())
        assert (reloaded(ids).logits - expected).abs().max() > 1e-3
        for wrapper in (w for w in reloaded.modules() if isinstance(w, ModulesToSaveWrapper)):
            wrapper.modules_to_save["default"].load_state_dict(copies[id(wrapper)])
        merged = reloaded.merge_and_unload()
        assert type(merged) is MTAForCausalLM and not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


class GradientRecorder(TrainerCallback):
    """Keeps the gradients of the first optimizer step."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["mta", "full", "lora"])
def test_trainer_gradient_checkpointing_gives_the_same_gradients(tmp_path, mode):
    def first_step(checkpointing: bool):
        torch.manual_seed(0)  # the same LoRA initialisation in both runs
        model = prepare_for_training(random_mta_model(**ALL_MTA_OPS).train(), mode)
        calls = []
        attention = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
        attention.register_forward_hook(lambda *args: calls.append(1))
        recorder = GradientRecorder(model)
        tiny_trainer(model, periodic_blocks(), tmp_path, 1e-3, steps=1, checkpointing=checkpointing,
                     callbacks=[recorder]).train()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in the backward pass
        return recorder.grads

    plain, checkpointed = first_step(False), first_step(True)
    assert plain.keys() == checkpointed.keys() and plain
    assert any(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_targets_and_modules_to_save_follow_the_model():
    model = random_mta_model(kq_conv_size=[3, 3], head_mix_post_size=None, group_norm=False, attn_gate=None)
    assert present_mta_modules(model) == ["kq_conv"]
    config = prepare_for_training(model, "lora", LoraOptions(rank=4, mlp=True)).peft_config["default"]
    assert config.modules_to_save == ["kq_conv"] and config.r == 4
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    bare = random_mta_model(mta_layers=[], head_mix_post_size=None, group_norm=False, attn_gate=None)
    with pytest.raises(ValueError, match="no MTA parameters"):
        prepare_for_training(bare, "mta")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_model_rebuilds_from_its_state_dict(mode):
    torch.manual_seed(0)
    trained = prepare_for_training(random_mta_model(**ALL_MTA_OPS, tie_word_embeddings=True), mode)
    rebuilt = model_from_state_dict(trained.config if mode == "full" else trained.get_base_model().config, mode,
                                    LoraOptions(), trained.state_dict())
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids).logits, trained.eval()(ids).logits, atol=0, rtol=0)
