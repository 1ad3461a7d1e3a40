"""Check a converted folder against its Llama: logits on a fixed prompt, and a greedy continuation.

Both models run in float32 (half-precision weights upcast exactly), so what is compared is the
conversion itself, not the rounding of different attention kernels in bf16; hence one tolerance
for every checkpoint dtype.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from modeling_mta import MTAForCausalLM

PROMPT = "Multi-Token Attention lets each attention weight depend on several queries and keys at once."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
NEW_TOKENS = 20
TOLERANCE = 1e-5


@dataclass
class Verification:
    max_logit_diff: float
    prompt_tokens: int
    llama_continuation: list[int]
    mta_continuation: list[int]

    @property
    def ok(self) -> bool:
        return self.max_logit_diff <= TOLERANCE and self.llama_continuation == self.mta_continuation

    def summary(self) -> str:
        agree = "agree" if self.llama_continuation == self.mta_continuation else "DIFFER"
        verdict = "OK" if self.ok else "MISMATCH"
        return (
            f"verify: max |logit diff| = {self.max_logit_diff:.2e} over {self.prompt_tokens} prompt tokens "
            f"(tolerance {TOLERANCE:g}, float32); greedy continuations of {NEW_TOKENS} tokens {agree}: {verdict}"
        )


def prompt_ids(src: Path, vocab_size: int) -> torch.Tensor:
    """The fixed prompt through the source's tokenizer, or fixed token ids where it has none."""
    if any((src / name).exists() for name in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(src)(PROMPT, return_tensors="pt").input_ids
    return torch.tensor([[(7 * i + 3) % vocab_size for i in range(24)]])


@torch.no_grad()
def logits_and_greedy(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    greedy = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS)  # not the folder's sampling settings
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, generation_config=greedy)
    return model(ids).logits, out[0, ids.shape[1] :].tolist()


def verify_llama(src: str | Path, dst: str | Path) -> Verification:
    """Compare the MTA model in `dst` with the Llama in `src`; the models are loaded one after the other."""
    src, dst = Path(src), Path(dst)
    llama = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = prompt_ids(src, llama.config.vocab_size)
    llama_logits, llama_tokens = logits_and_greedy(llama, ids)
    del llama
    mta = MTAForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    mta_logits, mta_tokens = logits_and_greedy(mta, ids)
    return Verification(
        max_logit_diff=(mta_logits - llama_logits).abs().max().item(),
        prompt_tokens=ids.shape[1],
        llama_continuation=llama_tokens,
        mta_continuation=mta_tokens,
    )
