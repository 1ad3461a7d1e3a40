"""Hub-ready folders: weights, config with `auto_map`, the model code, model card, tokenizer; and their upload.

A folder written here loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
(and `AutoModel`) wherever Transformers is installed, without this package. It appears all at
once (`conversion.safe_output`): a failure leaves nothing half-written.
"""

from pathlib import Path

import torch
from huggingface_hub import HfApi
from peft import PeftModel

from conversion.mta_folder import save_config_and_code
from conversion.safe_output import staged_output

ADAPTER_FOLDER = "adapter"


def save_hub_folder(trained: torch.nn.Module, dst: str | Path, *, card: str, tokenizer=None,
                    dtype: torch.dtype | None = None, src: str | Path | None = None, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write `trained` (an MTAForCausalLM, or its PEFT LoRA model) as a Hub-ready folder at `dst`.

    A LoRA model is saved twice: its adapter (with the trained MTA modules) under `adapter/`, and
    merged into the weights of the folder itself. `dtype` converts the weights (default: as they are);
    `src`, the folder the model came from, is checked not to overlap `dst`. `extra_files` maps file
    names to text written beside the weights.
    """
    with staged_output(src, dst, overwrite) as staging:
        if isinstance(trained, PeftModel):
            trained.save_pretrained(staging / ADAPTER_FOLDER)
            model = trained.merge_and_unload()
        else:
            model = trained
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(staging)
        # save_pretrained records only AutoModelForCausalLM in `auto_map`; this adds AutoModel.
        save_config_and_code(model.config, staging, model.dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(card, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
    return Path(dst)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, api: HfApi | None = None) -> str:
    """Upload a folder written by `save_hub_folder` to the model repository `repo_id` (made if absent); its URL.

    The folder is uploaded as it is, so what was checked on disk is what the Hub receives.
    """
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                               commit_message="Upload MTA model (mta finetune)")
    return str(getattr(commit, "commit_url", commit))
