"""A random-init Llama in HF format, for demos and tests (`shardtune tiny OUT_DIR`).
With --pretrain_steps N it first learns N steps of the bundled text (the demo does).

The tokenizer is a byte-level BPE trained on the sample dialogues bundled with
shardtune, so nothing is downloaded. Llama's special-token ids are kept
(<unk>=0, <s>=1, </s>=2) and, like Llama, it has no pad token.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data.samsum import bundled_sample
from ..errors import UserError

SPECIAL = ["<unk>", "<s>", "</s>"]


def bundled_text(splits: tuple[str, ...] = ("train", "validation", "test"), summaries: bool = True) -> list[str]:
    raw = bundled_sample()
    texts = []
    for split in splits:
        for r in raw[split]:
            texts += [r["dialogue"], r["summary"]] if summaries else [r["dialogue"]]
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


def pretrain(model: LlamaForCausalLM, tok, steps: int, seq_len: int = 128, batch: int = 8,
             lr: float = 3e-3, seed: int = 0) -> float:
    """A few hundred steps of plain language modelling on the bundled text, so that
    demos and tests fine-tune a model with some signal instead of pure noise."""
    eos = tok.eos_token or ""
    # train-split dialogues only: summaries and held-out text stay unseen for the fine-tune
    text = "".join(t + eos for t in bundled_text(("train",), summaries=False))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss)


def build_tiny(
    out_dir: str,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 176,
    tokenizer: str | None = None,
    seed: int = 0,
    pretrain_steps: int = 0,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
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
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        pretrain(model, tok, pretrain_steps, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
