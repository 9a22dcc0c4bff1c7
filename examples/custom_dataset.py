"""An example custom dataset for shardtune (the llama-recipes `custom_dataset` contract).

    shardtune finetune --dataset custom_dataset --custom_dataset.file examples/custom_dataset.py ...

shardtune executes this file as Python code because you named it, then calls
get_custom_dataset(dataset_config, tokenizer, split). It must return a list (or a
datasets.Dataset, or a torch Dataset) of dicts with `input_ids` and `labels`, where
label -100 marks a token that is not trained; `attention_mask` is optional. A
`get_data_collator(tokenizer)` function, if this file defined one, would build the
batches instead of shardtune's packing.

This one turns dialogues into a small instruction dataset ("write a one-line summary").
By default it reads the SAMSum sample bundled with shardtune, so it trains offline. Set
CUSTOM_DATASET_JSON to a JSON file of {"dialogue": ..., "summary": ...} records (a list,
or {"train": [...], "validation": [...]}) to use your own; a plain list is split 90/10.
"""
import json
import os
from importlib import resources

INSTRUCTION = "### Instruction:\nWrite a one-line summary of this conversation.\n\n### Conversation:\n{dialogue}\n\n### Summary:\n"


def _records(split: str) -> list[dict]:
    path = os.environ.get("CUSTOM_DATASET_JSON")
    if path:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    else:
        data = json.loads(resources.files("shardtune").joinpath("sample_data/samsum_sample.json").read_text("utf-8"))
    if isinstance(data, dict):
        return data["train" if split == "train" else "validation"]
    cut = len(data) * 9 // 10
    return data[:cut] if split == "train" else data[cut:]


def get_custom_dataset(dataset_config, tokenizer, split):
    examples = []
    for rec in _records(split):
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(
            INSTRUCTION.format(dialogue=rec["dialogue"]), add_special_tokens=False)
        answer = tokenizer.encode(rec["summary"], add_special_tokens=False) + [tokenizer.eos_token_id]
        examples.append({
            "input_ids": prompt + answer,
            "labels": [-100] * len(prompt) + answer,  # train on the summary only
            "attention_mask": [1] * (len(prompt) + len(answer)),
        })
    return examples
