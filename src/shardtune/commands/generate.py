"""`shardtune generate`: complete prompts with a base model and an optional adapter."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..data.chat_templates import TEMPLATES as CHAT_TEMPLATES
from ..data.records import BadRecords, read_records, valid_records
from ..data.samsum import bundled_sample
from ..data.templates import TEMPLATES, Template, chat_template
from ..errors import UserError, exit_on_user_error
from ..inference import DTYPES, Sampling, complete, load_for_inference


def sample_dialogue() -> str:
    return bundled_sample()["test"][0]["dialogue"]


def read_input(path: str, template: Template, bad: BadRecords) -> list[dict]:
    """JSON lines (or any format the data stage reads), each record with the template's fields."""
    records = valid_records(read_records(path, bad), template.required, path, bad, optional=template.optional)
    if template.check is None:
        return records
    good = []
    for index, record in enumerate(records):
        problem = template.check(record)
        if problem:
            bad.report(f"{path} record {index}: {problem}")
        else:
            good.append(record)
    return good


def _parser() -> argparse.ArgumentParser:
    fields = "; ".join(f"{name}: {', '.join(t.required + t.optional)}" for name, t in TEMPLATES.items())
    p = argparse.ArgumentParser(
        prog="shardtune generate", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Complete prompts with a base model plus an optional PEFT adapter (lora, llama_adapter, prefix), "
                    "or a merged/converted model directory, using a dataset's training prompt.",
        epilog="examples:\n"
               "  shardtune generate --model_name demo_out/tiny-llama --peft_model demo_out/adapter\n"
               "  shardtune generate --model_name BASE --peft_model ADAPTER --prompt 'Amy: hi!\\nBob: hello'\n"
               "  shardtune generate --model_name MERGED --template grammar --prompt 'she go home'\n"
               "  shardtune generate --peft_model ADAPTER --input in.jsonl --output out.jsonl "
               "--temperature 0.7 --top_p 0.9 --seed 1\n\n"
               f"--input record fields per template ({fields}); each output line is the record plus \"generated\".")
    p.add_argument("--model_name", help="base model directory (a merged or converted one too); "
                                        "default: the base recorded in the adapter")
    p.add_argument("--peft_model", help="PEFT adapter directory (lora, llama_adapter or prefix)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", "--dialogue", dest="prompt",
                        help="the text the template wraps (default: the bundled sample dialogue)")
    source.add_argument("--input", help="JSON lines file of records; writes JSON lines")
    p.add_argument("--output", help="JSON lines output for --input (default: stdout)")
    p.add_argument("--template", choices=list(TEMPLATES), default="samsum",
                   help="the dataset prompt that wraps the text (default: samsum)")
    p.add_argument("--chat_template", choices=list(CHAT_TEMPLATES),
                   help="with --template chat, for a tokenizer without its own chat template")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--top_k", type=int, default=50, help="top-k sampling, 0 = off (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed, set before every prompt")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--on_bad_record", choices=["error", "skip"], default="error",
                   help="--input records without the template's fields: stop (default) or leave them out")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from .. import device as device_lib

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.output and not args.input:
        raise UserError("--output is for --input files; --prompt prints its completion")
    template = chat_template(args.chat_template) if args.template == "chat" else TEMPLATES[args.template]
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    bad = BadRecords(args.on_bad_record)
    records = read_input(args.input, template, bad) if args.input else None  # bad input fails before loading
    model, tokenizer = load_for_inference(args.model_name, args.peft_model, device_lib.setup().device,
                                          DTYPES[args.dtype])
    if records is None:
        return _one_prompt(model, tokenizer, template, sampling, args.prompt)
    _write_completions(model, tokenizer, template, sampling, records, args.output)
    return 0


def _one_prompt(model, tokenizer, template: Template, sampling: Sampling, prompt: Optional[str]) -> int:
    if prompt is not None:
        print(complete(model, tokenizer, template.encode(tokenizer, {template.text_field: prompt}), sampling))
        return 0
    if template is not TEMPLATES["samsum"]:
        raise UserError("pass --prompt TEXT or --input FILE (the bundled sample is a SAMSum dialogue)")
    # The demo's output: the bundled sample dialogue and its summary.
    dialogue = sample_dialogue()
    print("Dialogue:\n" + dialogue.replace("\r\n", "\n"))
    print("Generated summary:\n" + complete(model, tokenizer, template.encode(tokenizer, {"dialogue": dialogue}),
                                            sampling))
    return 0


def _write_completions(model, tokenizer, template: Template, sampling: Sampling, records: list[dict],
                       output: Optional[str]) -> None:
    from tqdm import tqdm

    try:
        out = open(output, "w", encoding="utf-8") if output else sys.stdout
    except OSError as err:
        raise UserError(f"cannot write --output {output}: {err.strerror}; pass a writable file path") from None
    try:
        for record in tqdm(records, desc="generate", dynamic_ncols=True):
            text = complete(model, tokenizer, template.encode(tokenizer, record), sampling)
            out.write(json.dumps({**record, "generated": text}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if output:
            out.close()
