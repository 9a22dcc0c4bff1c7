"""`shardtune eval`: a model (plus an optional adapter) on a dataset's validation or test
split, read and tokenized by the data stage exactly as training reads it.

    shardtune eval --model_name BASE --peft_model ADAPTER --dataset samsum_dataset \\
        --samsum_dataset.data_path DIR --split test --max_samples 200 --output report.json

Reports the token-weighted loss (sum of per-token losses / number of label tokens, over
all batches) and its perplexity; for samsum_dataset the ROUGE-1/2/L of greedy summaries
against the reference summaries, for grammar_dataset the GLEU and exact match of greedy
corrections against every reference of the same input. On preference_dataset: the
--dpo_config loss over the pairs and TRL's rewards/logps metrics, among them the preference
accuracy (rewards/accuracies: the share of pairs whose chosen reward beats the rejected one);
the reference is the base with --peft_model's adapter disabled, or --dpo_config.reference DIR.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .. import data
from ..metrics import scores
from ..config.parse import parse_args
from ..config.schema import DATASETS, Configs
from ..data.packing import collate, pack
from ..data.records import BadRecords
from ..data.tokenize import IGNORE_INDEX, Example
from ..errors import UserError, exit_on_user_error
from ..files import atomic_path
from ..inference import DTYPES, Sampling, base_model_name, complete, load_for_inference
from ..modeling.load import load_tokenizer, resolve_model_dir
from ..metrics.logs import perplexity
from ..modeling.loss import token_loss_sum

# dataset -> the generation metric its references support; other datasets report the loss only


@torch.no_grad()
def token_loss(model, examples: list[Example], context_length: int, batch_size: int, pad_id: int) -> tuple[float, int]:
    """(sum of per-token losses, number of label tokens) over the examples, truncated and
    batched one example per row as training's validation does."""
    device = next(model.parameters()).device
    chunks, _ = pack(examples, context_length, packing=False)
    loss_sum, label_tokens = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_size), desc="loss", dynamic_ncols=True):
        batch = collate(chunks[start:start + batch_size], pad_id)
        # mask_from_positions: one example per row, so the padding is masked out, which
        # a prefix adapter (a KV cache, no packing) needs and the other methods allow
        loss_sum += token_loss_sum(model, batch, device, mask_from_positions=True).item()
        label_tokens += batch["num_targets"]
    return loss_sum, label_tokens


def prompt_and_target(example: Example) -> tuple[list[int], list[int]]:
    """The prompt (the leading unlabelled tokens) and the target tokens of one example."""
    labels = example["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:start]), [label for label in labels[start:] if label != IGNORE_INDEX]


def generation_scores(metric: str, model, tokenizer, examples: list[Example], sampling: Sampling) -> dict:
    """Greedy completions of each distinct prompt scored against its references (the
    decoded targets of every example with that prompt: JFLEG-style CSVs repeat an input
    once per reference)."""
    references: dict[tuple[int, ...], list[str]] = {}
    for example in examples:
        prompt, target = prompt_and_target(example)
        references.setdefault(tuple(prompt), []).append(tokenizer.decode(target, skip_special_tokens=True).strip())
    hypotheses = [complete(model, tokenizer, list(prompt), sampling)
                  for prompt in tqdm(references, desc="generate", dynamic_ncols=True)]
    return {"num_prompts": len(hypotheses), **SCORERS[metric](hypotheses, list(references.values()))}


def _rouge(hypotheses: list[str], references: list[list[str]]) -> dict:
    # one reference per dialogue: score against the first
    return {"rouge": scores.rouge(hypotheses, [refs[0] for refs in references])}


def _gleu(hypotheses: list[str], references: list[list[str]]) -> dict:
    return {"gleu": scores.gleu(hypotheses, references), "exact_match": scores.exact_match(hypotheses, references)}


# a dataset's generation_metric (config.schema.DATASETS) -> its scores of the completions
SCORERS = {"rouge": _rouge, "gleu": _gleu}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardtune eval", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Loss and perplexity, plus ROUGE (samsum_dataset) or GLEU (grammar_dataset) of greedy "
                    "generations, on a dataset split prepared exactly as for training. Also takes the "
                    "finetune flags of the model and data: --model_name, --tokenizer_name, --dataset, "
                    "--samsum_dataset.data_path, --grammar_dataset.test_split, --context_length, "
                    "--val_batch_size, --on_bad_record, --config FILE.yaml, ...",
        epilog="examples:\n"
               "  shardtune eval --model_name BASE --peft_model ADAPTER --samsum_dataset.data_path DIR "
               "--split test --max_samples 100 --output report.json\n"
               "  shardtune eval --model_name MERGED --dataset grammar_dataset "
               "--split data/grammar_validation.csv")
    p.add_argument("--peft_model", help="PEFT adapter directory (lora, llama_adapter or prefix)")
    p.add_argument("--split", help="split to evaluate (default: the dataset's test_split, the validation split "
                                   "of training): samsum train|validation|test, alpaca train|val, grammar a CSV path")
    p.add_argument("--max_samples", type=int, default=0, help="evaluate the first N examples (0 = all)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="per generated summary or correction")
    p.add_argument("--output", help="write the JSON report here too")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    return p


def _configs(rest: list[str], split: Optional[str]) -> Configs:
    cfgs = parse_args(rest)
    data.check_flags(cfgs.train, pairs=DATASETS[cfgs.train.dataset].pairs if cfgs.train.dataset in DATASETS else False)
    if split:
        cfgs.dataset.test_split = split
    return cfgs


def evaluate_model(cfgs: Configs, peft_model: Optional[str], max_samples: int, max_new_tokens: int,
             dtype: torch.dtype) -> dict:
    from .. import device as device_lib

    t = cfgs.train
    if max_samples < 0:
        raise UserError("--max_samples must be >= 0 (0 = all)")
    sampling = Sampling(max_new_tokens)  # greedy; checked before the model loads
    model_name = base_model_name(t.model_name if cfgs.was_set(t, "model_name") else None, peft_model)
    # the data first, with the tokenizer alone: bad data fails before the model loads
    tokenizer = load_tokenizer(t.tokenizer_name or str(resolve_model_dir(model_name)))
    source = data.source(cfgs, cfgs.dataset.test_split)
    if DATASETS[t.dataset].pairs:
        return preference_report(cfgs, model_name, peft_model, tokenizer, source, max_samples, dtype)
    examples = source.read(tokenizer, BadRecords(t.on_bad_record))
    if max_samples:
        examples = examples[:max_samples]
    if not examples:
        raise UserError(f"{source.name}: no examples to evaluate; check the dataset flags and --split")
    model, _ = load_for_inference(model_name, peft_model, device_lib.setup().device, dtype)
    loss_sum, label_tokens = token_loss(model, examples, t.context_length, t.val_batch_size, tokenizer.pad_token_id)
    if not label_tokens:
        raise UserError(f"{source.name}: no label tokens within --context_length {t.context_length}; raise it")
    loss = loss_sum / label_tokens
    report = {"model": model_name, "peft_model": peft_model, "dataset": t.dataset, "split": source.name,
              "num_samples": len(examples), "label_tokens": label_tokens, "loss": loss, "perplexity": perplexity(loss)}
    metric = DATASETS[t.dataset].generation_metric
    if metric:
        report["max_new_tokens"] = max_new_tokens
        report.update(generation_scores(metric, model, tokenizer, examples, sampling))
    return report


def preference_report(cfgs: Configs, model_name: str, peft_model: Optional[str], tokenizer, source,
                      max_samples: int, dtype: torch.dtype) -> dict:
    """The preference loss and TRL's metrics over the split's pairs (loop.evaluate, one process)."""
    from .. import device as device_lib, loop
    from ..config.validate import check_dpo
    from ..data.pairs import PairDataset, collate_pairs, fit_pairs
    from ..data.sampler import EvalSampler
    from ..modeling.preference import PROMPT_NLL, REFERENCE_FREE, PairLoss, PreferenceLoss, reference_logps

    t, d = cfgs.train, cfgs.dpo
    check_dpo(cfgs)
    needs_reference = d.loss_type not in REFERENCE_FREE
    separate_reference = d.reference not in ("base", "precomputed")
    if needs_reference and not separate_reference and not peft_model:
        raise UserError(f"--dpo_config.loss_type {d.loss_type} compares with a reference: pass --peft_model (the "
                        "reference is then the base with the adapter disabled), --dpo_config.reference DIR, or a "
                        "reference-free --dpo_config.loss_type simpo")
    bad = BadRecords(t.on_bad_record)
    pairs, truncated, dropped = fit_pairs(source.read(tokenizer, bad), t.context_length, bad, d.truncation_mode)
    pairs = pairs[:max_samples] if max_samples else pairs
    if not pairs:
        raise UserError(f"{source.name}: no preference pairs to evaluate; check the dataset flags and --split")
    dist = device_lib.setup()
    model, _ = load_for_inference(model_name, peft_model, dist.device, dtype)
    reference = None
    if needs_reference and separate_reference:
        reference = reference_logps(load_for_inference(d.reference, None, dist.device, dtype)[0], dist.device)
    elif needs_reference:  # the trained adapter switched off: its base
        reference = reference_logps(model, dist.device, adapter_of=model)
    objective = PreferenceLoss(PairLoss(d.loss_type, d.beta, d.label_smoothing, d.simpo_gamma, d.orpo_alpha), reference)
    dataset = PairDataset(pairs)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=EvalSampler(len(dataset), t.val_batch_size, 1, 0),
        collate_fn=lambda items: collate_pairs(items, tokenizer.pad_token_id, t.context_length, packing=False,
                                                 chosen_prompt_targets=d.loss_type in PROMPT_NLL))
    cfg = loop.LoopConfig(accum=1, world=1, max_train_step=0, max_eval_step=0, grad_clip=None, log_every=1,
                          objective=objective)
    loss, stats, _ = loop.evaluate(model, loader, dist, cfg)
    return {"model": model_name, "peft_model": peft_model, "dataset": t.dataset, "split": source.name,
            "num_pairs": len(pairs), "bad_records": bad.count, "truncated_pairs": truncated, "dropped_pairs": dropped,
            "loss_type": d.loss_type, "loss": loss,
            "preference_accuracy": stats["rewards/accuracies"], **stats}


def write_report(report: dict, path: str) -> None:
    """Written to a temporary sibling and renamed: a reader never sees half a report."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write --output {path}: {err.strerror}; pass a writable file path") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    cfgs = _configs(rest, args.split)
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise UserError(f"the directory of --output {args.output} does not exist; create it first")
    report = evaluate_model(cfgs, args.peft_model, args.max_samples, args.max_new_tokens, DTYPES[args.dtype])
    if args.output:
        write_report(report, args.output)
    print(json.dumps(report))
    return 0
