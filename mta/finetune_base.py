"""What a fine-tune starts from: the MTA model (an MTA folder, a Llama folder retrofitted in memory, or a
tiny Llama built here) and the tokens its text is cut into."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conversion import retrofit_llama
from conversion.json_files import read_json_object
from modeling_mta import MTAForCausalLM

from .demo import tiny_llama
from .finetune_errors import FinetuneError
from .text_data import ByteTokens, TokenizerTokens

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
BYTES = "bytes"


@dataclass
class Base:
    model: MTAForCausalLM
    description: str  # for the model card
    folder: Path | None  # where it was read from; None for the tiny model


def load_base(folder: str | None, tiny_seed: int | None, recipe: dict) -> Base:
    """The float32 MTA model to fine-tune: from `folder` (MTA or Llama), or the tiny Llama of `mta demo`.

    `recipe` holds MTA options for a retrofit (Llama folder or tiny); an MTA folder has its recipe already.
    """
    if folder is None:
        model = retrofit_llama(tiny_llama(tiny_seed), **recipe)
        return Base(model, f"a tiny random Llama built locally (`mta demo`'s, seed {tiny_seed}), retrofitted", None)
    folder = Path(folder)
    model_type = read_json_object(folder / "config.json", "is it a model folder?").get("model_type")
    if model_type == "mta":
        if recipe:
            raise FinetuneError(f"{folder} is an MTA model already: the MTA recipe options {sorted(recipe)} apply "
                                "only to Llama folders (retrofitted on the fly); drop them")
        return Base(MTAForCausalLM.from_pretrained(folder, dtype=torch.float32), str(folder), folder)
    if model_type == "llama":
        llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        description = f"{folder} (Llama, retrofitted with identity MTA parameters)"
        return Base(retrofit_llama(llama, **recipe), description, folder)
    raise FinetuneError(f"{folder} holds a {model_type!r} model: expected an MTA folder (`mta convert-llama`) "
                        "or a Llama folder")


def load_tokens(choice: str | None, base: Base):
    """ByteTokens or a folder's tokenizer: `choice` is a folder, "bytes", or None for the base folder's own."""
    if choice == BYTES or (choice is None and base.folder is None):
        tokens = ByteTokens()
    else:
        folder = Path(choice) if choice is not None else base.folder
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            raise FinetuneError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): pass --tokenizer DIR, or "
                            f"--tokenizer {BYTES} to use the UTF-8 bytes of the text as token ids")
        tokens = TokenizerTokens(AutoTokenizer.from_pretrained(folder), str(choice or folder))
    vocab_size = base.model.config.vocab_size
    if tokens.vocab_size > vocab_size:
        raise FinetuneError(f"the tokens ({tokens.name}) need a vocabulary of {tokens.vocab_size}, but the model has "
                        f"{vocab_size} embeddings")
    return tokens
