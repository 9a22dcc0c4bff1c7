"""The benchmark workload, declared once: model sizes, the data subset, the training
settings every runner uses, and the packed batches the packed runners all consume.

Runs in the project's venv (it uses shardtune's own data pipeline, so every runner sees
byte-identical token ids). The torchtune runner, in its own venv, reads only the files
this module writes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
LLAMA2_TOKENIZER = SHARED_DATA / "tokenizers" / "llama2"
SAMSUM = SHARED_DATA / "samsum"


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


SIZES = {
    "micro": ModelSize(hidden=64, layers=2, heads=4, intermediate=176),  # the smoke test's
    "tiny": ModelSize(hidden=256, layers=4, heads=8, intermediate=688),  # ~19M params
    "small": ModelSize(hidden=768, layers=12, heads=12, intermediate=2048),  # ~124M params
}


@dataclass(frozen=True)
class Settings:
    """What every runner trains with (shardtune's llama-recipes defaults where it has one)."""

    dialogues: int = 400  # first N SAMSum train records: one epoch
    micro_batch: int = 4
    context: int = 512
    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    peft: bool = True  # False: full fine-tuning (the Distributed section's sharding runs)
    seed: int = 42
    warmup_steps: int = 2  # steps left out of the per-step timing
    max_steps: int = 0  # 0 = the whole epoch; the quick mode cuts it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        raw = json.loads(text)
        raw["lora_targets"] = tuple(raw["lora_targets"])
        return cls(**raw)


def build_model(size: str, out: Path) -> Path:
    """A random-init Llama of `size` in HF format with the real Llama 2 tokenizer; reused
    when already built (seed 0: every run of the harness trains the same weights)."""
    from shardtune.modeling.tiny import build_tiny

    if (out / "config.json").is_file():
        return out
    dims = SIZES[size]
    return build_tiny(str(out), hidden_size=dims.hidden, num_layers=dims.layers, num_heads=dims.heads,
                      num_kv_heads=dims.heads, intermediate_size=dims.intermediate,
                      tokenizer=str(LLAMA2_TOKENIZER), seed=0)


def write_subset(out: Path, dialogues: int) -> Path:
    """A SAMSum directory with the first `dialogues` train records (and a few val ones,
    which shardtune's data path expects). Lives in the harness's work dir, never the repo."""
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", dialogues), ("val", 16)):
        records = json.loads((SAMSUM / f"{split}.json").read_text(encoding="utf-8"))[:count]
        (out / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
    return out


def shardtune_args(model_dir: Path, data_dir: Path, out_dir: Path, s: Settings) -> list[str]:
    """shardtune's flags for the workload (fp32, LoRA unless s.peft is False, packing)."""
    args = ["--model_name", str(model_dir), "--samsum_dataset.data_path", str(data_dir), "--batching_strategy", "packing",
            "--context_length", str(s.context), "--batch_size_training", str(s.micro_batch),
            "--num_epochs", "1", "--lr", str(s.lr), "--seed", str(s.seed), "--mixed_precision", "False",
            "--lora_config.r", str(s.lora_r), "--lora_config.lora_alpha", str(s.lora_alpha),
            "--lora_config.lora_dropout", str(s.lora_dropout),
            "--lora_config.target_modules", ",".join(s.lora_targets),
            "--run_validation", "False", "--num_workers_dataloader", "0", "--save_metrics",
            "--log_every", "1", "--output_dir", str(out_dir), "--overwrite_output_dir"]
    if s.peft:
        args += ["--use_peft", "--peft_method", "lora"]
    if s.max_steps:
        args += ["--max_train_step", str(s.max_steps)]
    return args


def packed_batches(model_dir: Path, data_dir: Path, s: Settings) -> list[dict]:
    """The epoch's batches exactly as shardtune's loader yields them at world size 1
    (same code, same seed): what the hand-written loop, the packed Trainer and torchtune
    train on, and what shardtune's token counts are taken from."""
    from shardtune import data
    from shardtune.modeling import load as model_lib
    from shardtune.config.parse import parse_args

    cfgs = parse_args(shardtune_args(model_dir, data_dir, data_dir / "unused", s))
    tokenizer = model_lib.load_tokenizer(str(model_dir))
    split = data.build_split(cfgs, tokenizer, "train")
    loader, sampler = data.train_loader(split, s.micro_batch, 1, 1, 0, s.seed, tokenizer.pad_token_id, 0)
    sampler.set_epoch(0)
    batches = list(loader)
    return batches[: s.max_steps] if s.max_steps else batches


def padded_examples(model_dir: Path, data_dir: Path, s: Settings) -> list[dict]:
    """One example per item (input_ids, labels, attention_mask), truncated to the context
    as shardtune truncates: what the padded Trainer's DataCollatorForSeq2Seq batches."""
    from shardtune.modeling import load as model_lib
    from shardtune.config.parse import parse_args
    from shardtune.data import samsum
    from shardtune.data.packing import truncate_each

    cfgs = parse_args(shardtune_args(model_dir, data_dir, data_dir / "unused", s))
    tokenizer = model_lib.load_tokenizer(str(model_dir))
    examples, _ = samsum.get_split(cfgs.dataset, tokenizer, "train")
    items, _ = truncate_each(examples, s.context)
    return items

