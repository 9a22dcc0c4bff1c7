"""What the GPU check trains on, built on the spot (a bare GPU machine has no ../shared, no
hub): a random-init Llama in HF format with a tokenizer trained on the bundled text, the
bundled SAMSum sample repeated into a data directory, and a stand-in for ../shared/data
that holds only that sample (for the core tests that read shared_data/samsum).

    python -m benchmarks.gpu_assets --shape 1b|smoke --device cuda|cpu --work DIR

Run by gpu_check.py as a step of its own (a subprocess: torch is imported here, never in
the driver). Prints one JSON line: the paths and the model's parameter count.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "shardtune" / "sample_data" / "samsum_sample.json"
# TinyLlama-1.1B: 22 layers, hidden 2048, GQA 32/4 heads, intermediate 5632, vocab 32000.
# Every projection also divides into torchao's NF4 blocks (64 x 256 = 16384 elements).
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # CPU smoke: the smallest shape whose projections still fit NF4 blocks (the 4-bit step)
    "smoke": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
}


def build_model(out: Path, shape: dict, device: str) -> tuple[Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.modeling.tiny import train_tokenizer

    tokenizer = train_tokenizer()  # 1,024 ids: they fit any vocab_size >= 1024
    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # a 1.1B init takes a minute on the CPU, a second on the GPU
        model = LlamaForCausalLM(config)
    # Saved in fp32 (the recipe keeps fp32 master weights either way; bf16 compute is FSDP's
    # mixed precision). A bf16 config.json would fail --resume auto: the recipe fingerprints
    # the config after loading has set its dtype to float32, and the resumed run reads bf16.
    tmp = out.with_name(out.name + ".tmp")  # renamed when whole: a killed build is never reused
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out, sum(p.numel() for p in model.parameters())


def write_data(out: Path, copies: int) -> Path:
    """The bundled sample's train split repeated (ids made unique), its validation split as is:
    enough packed chunks for the timed steps without an epoch boundary among them."""
    sample = json.loads(SAMPLE.read_text())
    out.mkdir(parents=True, exist_ok=True)
    train = [{**rec, "id": f"{rec['id']}-{copy}"} for copy in range(copies) for rec in sample["train"]]
    (out / "train.json").write_text(json.dumps(train))
    (out / "val.json").write_text(json.dumps(sample["validation"]))
    return out


def write_shared_standin(out: Path) -> Path:
    """out/samsum/{train,val,test}.json from the bundled sample, for SHARDTUNE_SHARED_DATA:
    the conftest fixture `shared_data` checks only samsum/train.json, so the tests that read
    nothing else run (gpu_check.CORE_TESTS). Tests that train on the validation split
    (test_parity: 10 steps of 4 chunks of 256 tokens) need more than its 16 dialogues: val
    here is the sample's train and validation splits together."""
    sample = json.loads(SAMPLE.read_text())
    (out / "samsum").mkdir(parents=True, exist_ok=True)
    splits = {"train": sample["train"], "val": sample["train"] + sample["validation"], "test": sample["test"]}
    for name, records in splits.items():
        (out / "samsum" / f"{name}.json").write_text(json.dumps(records))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=40)
    args = parser.parse_args(argv)
    model_dir = args.work / f"model-{args.shape}"
    if (model_dir / "config.json").is_file():  # a rerun into the same folder keeps the model
        params = None
    else:
        model_dir, params = build_model(model_dir, SHAPES[args.shape], args.device)
    print(json.dumps({"model": str(model_dir), "parameters": params,
                      "data": str(write_data(args.work / "data", args.copies)),
                      "shared_data": str(write_shared_standin(args.work / "shared-standin"))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
