"""save_pretrained / from_pretrained through the Auto classes, and trust_remote_code without the package."""

import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling_mta import MTAConfig, MTAForCausalLM, MTAModel

from .tiny import TINY, random_mta_model

FULL = dict(kq_conv_size=[3, 5], kq_conv_post_size=[2, 3], head_mix_size=2, head_mix_post_size=4,
            group_norm=True, attn_gate="scalar")


def test_round_trip_through_the_auto_classes(tmp_path):
    model = random_mta_model(**FULL)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for name in ("configuration_mta.py", "modeling_mta.py", "mta_reference.py", "mta_triton.py",
                 "group_norm_triton.py"):
        assert (tmp_path / name).exists(), name
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MTAConfig
    assert config.auto_map == {"AutoConfig": "configuration_mta.MTAConfig",
                               "AutoModelForCausalLM": "modeling_mta.MTAForCausalLM"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MTAForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is MTAModel
        torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, atol=0, rtol=0)


def test_bf16_round_trip_keeps_the_dtype(tmp_path):
    model = random_mta_model(dtype=torch.bfloat16, **FULL)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# Runs in a fresh interpreter where neither the repository nor the installed package can be imported.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, os, sys

    PACKAGES = {"modeling_mta", "configuration_mta", "conversion", "mta"}
    sys.path[:] = [p for p in sys.path if not any(os.path.exists(os.path.join(p or ".", n)) for n in PACKAGES)]

    class Refuse(importlib.abc.MetaPathFinder):  # also defeats editable-install finders
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in PACKAGES:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden for this test)")

    sys.meta_path.insert(0, Refuse())
    import torch
    from transformers import AutoModelForCausalLM

    folder, ids_file, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert not any(name.split(".")[0] in PACKAGES for name in sys.modules)
    with torch.no_grad():
        torch.save(model(torch.load(ids_file)).logits, out_file)
    """
)


def logits_without_the_package(folder, ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """The logits of the model in `folder`, loaded with trust_remote_code in a process that cannot import this package."""
    ids_file, out_file, script = tmp_path / "ids.pt", tmp_path / "logits.pt", tmp_path / "load.py"
    torch.save(ids, ids_file)
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(ids_file), str(out_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_file)


def test_saved_folder_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = random_mta_model(**FULL)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(logits_without_the_package(tmp_path / "model", ids, tmp_path), model(ids).logits,
                                   atol=0, rtol=0)
