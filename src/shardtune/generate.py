"""`shardtune generate`: load a base model plus a PEFT adapter with plain transformers
and peft (exactly what a user would do) and generate a summary for one dialogue."""
from __future__ import annotations


import torch

from .data.samsum import PROMPT, bundled_sample
from .errors import UserError
from .model import load_tokenizer, resolve_model_dir


def load_for_inference(model_name: str, peft_model: str | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if peft_model:
        try:
            model = PeftModel.from_pretrained(model, peft_model)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the adapter in {peft_model}: {str(err).splitlines()[0]}") from None
    return model.eval(), load_tokenizer(str(model_dir))


def sample_dialogue() -> str:
    return bundled_sample()["test"][0]["dialogue"]


@torch.no_grad()
def summarize(model, tokenizer, dialogue: str, max_new_tokens: int = 48) -> str:
    prompt = tokenizer.bos_token + PROMPT.format(dialog=dialogue)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
