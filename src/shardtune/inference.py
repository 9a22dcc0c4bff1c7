"""Inference: load a base model plus an optional PEFT adapter (or a merged or converted
model directory) with plain transformers and peft, exactly as a user would, and complete
prompts built with a dataset's training template. `shardtune generate` (commands/generate.py)
and `shardtune eval` run on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UserError
from .modeling.load import load_tokenizer, resolve_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy when temperature is 0, else seeded sampling."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 50  # llama-recipes' default; 0 = off
    seed: int = 42

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("need --max_new_tokens >= 1, --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")

    def generation_config(self, model, tokenizer):
        from transformers import GenerationConfig

        # Every sampling field is set here: generate() fills fields left unset from the
        # model's generation_config.json, which for Llama 2 turns sampling on.
        eos = model.generation_config.eos_token_id
        common = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id if eos is None else eos)
        if self.temperature == 0:
            return GenerationConfig(do_sample=False, num_beams=1, **common)
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, num_beams=1, **common)


def base_model_name(model_name: Optional[str], peft_model: Optional[str]) -> str:
    """model_name, or else the base model recorded in the adapter's config."""
    if model_name:
        return model_name
    if not peft_model:
        raise UserError("pass --model_name (a base, merged or converted model directory) and/or --peft_model")
    from peft import PeftConfig

    try:
        base = PeftConfig.from_pretrained(peft_model).base_model_name_or_path
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the adapter in {peft_model}: {str(err).splitlines()[0]}") from None
    if not base:
        raise UserError(f"{peft_model}/adapter_config.json names no base model; pass --model_name")
    return base


def load_for_inference(model_name: Optional[str], peft_model: Optional[str], device: torch.device | None = None,
                       dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer). Without model_name the adapter's recorded base is used."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(base_model_name(model_name, peft_model))
    # use_safetensors: a pickle checkpoint (.bin) can run code, so it is never read
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise UserError(f"cannot load the model in {model_dir}: {str(err).splitlines()[0]}") from None
    if peft_model:
        try:
            model = PeftModel.from_pretrained(model, peft_model)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the adapter in {peft_model}: {str(err).splitlines()[0]}") from None
    if device is not None:
        model.to(device)
    return model.eval(), load_tokenizer(str(model_dir))


@torch.no_grad()
def complete(model, tokenizer, prompt_ids: list[int], sampling: Sampling) -> str:
    """The text generated after prompt_ids. Sampling reseeds before every prompt, so a
    prompt's completion does not depend on what was generated before it."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    config = sampling.generation_config(model, tokenizer)
    torch.manual_seed(sampling.seed)
    if _is_prefix_tuned(model):
        out = _decode_without_cache(model, ids, config)
    else:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _is_prefix_tuned(model) -> bool:
    from peft import PeftModel, PeftType

    return isinstance(model, PeftModel) and model.active_peft_config.peft_type == PeftType.PREFIX_TUNING


def _decode_without_cache(model, ids: torch.Tensor, config) -> torch.Tensor:
    """Greedy or sampled decoding with one full forward per new token. For prefix tuning
    only: with transformers 5.24 and peft 0.21, generate() replaces the prefix (peft passes
    it as past_key_values) with its own empty cache, so the adapter is silently ignored;
    the plain forward applies it. tests/unit/test_generate.py::test_generate_still_drops_the_prefix
    fails once generate() is fixed, and this can go."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if config.do_sample:
        warpers += [TemperatureLogitsWarper(config.temperature), TopPLogitsWarper(config.top_p)]
        if config.top_k:
            warpers.insert(1, TopKLogitsWarper(config.top_k))
    stop = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    for _ in range(config.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
        scores = warpers(ids, logits)
        if config.do_sample:
            next_id = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            next_id = scores.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        if next_id.item() in stop:
            break
    return ids
