"""`shardtune tiny OUT_DIR`: a random-init Llama in HF format, for demos and tests.

The tokenizer is a byte-level BPE trained on the sample dialogues bundled with
shardtune, so nothing is downloaded. Llama's special-token ids are kept
(<unk>=0, <s>=1, </s>=2) and, like Llama, it has no pad token.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .errors import UserError

SPECIAL = ["<unk>", "<s>", "</s>"]


def bundled_text() -> list[str]:
    raw = resources.files("shardtune").joinpath("sample_data/samsum_sample.json").read_text(encoding="utf-8")
    texts = []
    for records in json.loads(raw).values():
        for r in records:
            texts += [r["dialogue"], r["summary"]]
    return texts


def train_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prompts = ["Summarize this dialog:\n", "\n---\nSummary:\n", "Correct this to standard English: "]
    tok.train_from_iterator(bundled_text() + prompts * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny(
    out_dir: str,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 176,
    tokenizer: str | None = None,
    seed: int = 0,
) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose a new directory for the tiny model")
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
