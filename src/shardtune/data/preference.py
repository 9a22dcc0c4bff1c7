"""preference_dataset: (prompt, chosen, rejected) records for DPO, tokenized as TRL's DPOTrainer does.

A record has TRL's explicit-prompt layouts (other fields are ignored):
  plain           {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt": [{"role", "content"}, ...], "chosen": [one assistant message],
                   "rejected": [one assistant message]}

Token ids follow trl 1.16's DPOTrainer._prepare_dataset, so a model trained here sees what
it would see under TRL (tests/unit/test_preference.py compares the two on the same records):
  * plain: EOS is appended to chosen and rejected unless they already end with it; then
    prompt, prompt+chosen and prompt+rejected are tokenized with the tokenizer's default
    special tokens (BOS for Llama). No chat template is applied, as in TRL.
  * conversational: the prompt is rendered with the assistant turn opened
    (add_generation_prompt), prompt+chosen and prompt+rejected as whole conversations, with
    the tokenizer's chat template or --preference_dataset.template; the template writes the
    special tokens itself.
  * the completion starts where the prompt's ids and prompt+completion's ids diverge (the
    shorter of the two common prefixes), not at len(prompt ids): a prompt that ends inside a
    token (e.g. grammar's "Corrected: " before "The") would otherwise be split mid-token.

Splits: validation is the first 5% of data_path (int(n / 20) records) and training the rest,
unless --preference_dataset.validation_path names a separate file, exactly as chat_dataset.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .chat import (OWN_TEMPLATE, TEMPLATE_CHOICES, BadConversation, ChatRenderer, Message, parse_conversation,
                   split_bounds, split_role)
from .chat_templates import TEMPLATES
from .records import BadRecords, locate, read_records, where
from .source import Source, file_digest

FIELDS = ("prompt", "chosen", "rejected")
TEMPLATE_FLAG = "--preference_dataset.template"
# Bumped when how a record becomes ids changes, so cached splits are rebuilt.
_TOKENIZE_RULE_VERSION = 1

# {"prompt_ids", "chosen_ids", "rejected_ids": list[int], "origin": "<file> record <n>"}
Pair = dict


def origin(source: str, index: int) -> str:
    """Where a pair came from, for messages: the file and the record (0-based, as every
    bad-record message in shardtune counts them, so the two name the same record)."""
    file, record = locate(source, index)
    return f"{file} record {record}"


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _completion(turns, field: str) -> Message:
    """chosen/rejected of a conversational record: exactly one assistant message."""
    if not isinstance(turns, list) or len(turns) != 1:
        got = f"{len(turns)} messages" if isinstance(turns, list) else _type_name(turns)
        raise BadConversation(f"{field} must be a list holding one assistant message, got {got}")
    try:
        (message,) = parse_conversation({"messages": turns})
    except BadConversation as err:
        raise BadConversation(f"{field}: {err}") from None
    if message.role != "assistant":
        raise BadConversation(f"{field} must be an assistant message, got role {message.role!r}")
    return message


def _check_shape(record) -> bool:
    """True for a conversational record, False for a plain one; raises BadConversation
    for anything else."""
    if not isinstance(record, dict):
        raise BadConversation(f"expected an object with fields {list(FIELDS)}, got {_type_name(record)}")
    for name in FIELDS:
        if name not in record:
            raise BadConversation(f"missing field {name!r}")
    kinds = [type(record[name]) for name in FIELDS]
    if kinds == [str, str, str]:
        for name in FIELDS:
            if not record[name].strip():
                raise BadConversation(f"empty {name}")
        return False
    if kinds == [list, list, list]:
        return True
    raise BadConversation("prompt, chosen and rejected must be three strings or three message lists, got "
                          + ", ".join(_type_name(record[name]) for name in FIELDS))


class _Texts:
    """The three texts of each good record, in the order they will be tokenized."""

    def __init__(self) -> None:
        self.prompts, self.with_chosen, self.with_rejected, self.where = [], [], [], []

    def add(self, prompt: str, with_chosen: str, with_rejected: str, index: int) -> None:
        self.prompts.append(prompt)
        self.with_chosen.append(with_chosen)
        self.with_rejected.append(with_rejected)
        self.where.append(index)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_ids(tokenizer, texts: _Texts, add_special_tokens: bool, source: str) -> list[tuple[int, Pair]]:
    """(record index, pair) for each record of `texts`; one batched tokenizer call."""
    if not texts.where:
        return []
    n = len(texts.where)
    ids = tokenizer(texts.prompts + texts.with_chosen + texts.with_rejected,
                    add_special_tokens=add_special_tokens)["input_ids"]
    out = []
    for k, index in enumerate(texts.where):
        prompt, with_chosen, with_rejected = ids[k], ids[n + k], ids[2 * n + k]
        cut = min(_common_prefix_length(prompt, with_chosen), _common_prefix_length(prompt, with_rejected))
        out.append((index, {"prompt_ids": prompt[:cut], "chosen_ids": with_chosen[cut:],
                            "rejected_ids": with_rejected[cut:], "origin": origin(source, index)}))
    return out


def tokenize_pairs(tokenizer, records: list, source: str, bad: BadRecords, template: Optional[str] = None,
                   system_prompt: str = "", start: int = 0) -> list[Pair]:
    """Pairs of the good records, in file order; bad ones go to `bad` named by `source` and
    record index (`start` is the file position of records[0]). `template` is llama3|llama2|
    chatml or None for the tokenizer's own; it applies to conversational records only."""
    plain, chats = _Texts(), _Texts()
    renderer = None  # built at the first conversational record: plain data needs no chat template
    for i, record in enumerate(records, start=start):
        if record is None:
            continue  # unreadable, already reported
        try:
            if not _check_shape(record):
                eos = tokenizer.eos_token
                if not eos:
                    raise UserError("preference_dataset needs the tokenizer's eos_token (appended to chosen and "
                                    "rejected, as TRL does); add one to its tokenizer_config.json")
                chosen, rejected = (c if c.endswith(eos) else c + eos for c in (record["chosen"], record["rejected"]))
                if chosen == rejected:  # after EOS, so "a" and "a</s>" are the same text too
                    raise BadConversation("chosen and rejected are the same text, so there is no preference")
                plain.add(record["prompt"], record["prompt"] + chosen, record["prompt"] + rejected, i)
                continue
            try:
                prompt = parse_conversation({"messages": record["prompt"]})
            except BadConversation as err:
                raise BadConversation(f"prompt: {err}") from None
            chosen, rejected = _completion(record["chosen"], "chosen"), _completion(record["rejected"], "rejected")
            if chosen.content == rejected.content:
                raise BadConversation("chosen and rejected are the same text, so there is no preference")
            if system_prompt and prompt[0].role != "system":
                prompt = [Message("system", system_prompt), *prompt]
            renderer = renderer or ChatRenderer(tokenizer, template, TEMPLATE_FLAG)
            renderer.check_content([*prompt, chosen, rejected])
            chats.add(renderer.render(prompt, generation_prompt=True), renderer.render([*prompt, chosen]),
                      renderer.render([*prompt, rejected]), i)
        except BadConversation as err:
            bad.report(f"{where(source, i)}: {err}")
    # Plain text gets the tokenizer's special tokens (BOS); a chat template writes its own.
    pairs = _split_ids(tokenizer, plain, True, source) + _split_ids(tokenizer, chats, False, source)
    return [pair for _, pair in sorted(pairs, key=lambda item: item[0])]


def source(dataset_config, split: str) -> Source:
    cfg = dataset_config
    if not cfg.data_path:
        raise UserError("preference_dataset needs its data: pass --preference_dataset.data_path FILE "
                        "(.jsonl, .json, .parquet or .arrow of prompt/chosen/rejected records, or a directory of them)")
    if cfg.template not in TEMPLATE_CHOICES:
        raise UserError(f"unknown {TEMPLATE_FLAG} {cfg.template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
    which = split_role(split, "preference_dataset")  # rejects an unknown split name before anything is read
    separate = bool(cfg.validation_path)
    path = Path(cfg.validation_path if separate and which == "validation" else cfg.data_path).expanduser()
    if not path.exists():
        raise UserError(f"preference data {path} does not exist; "
                        "check --preference_dataset.data_path / validation_path")
    template = None if cfg.template == OWN_TEMPLATE else cfg.template

    def read(tokenizer, bad: BadRecords) -> list[Pair]:
        records = read_records(path, bad)
        start, end = split_bounds(len(records), split, separate, "preference_dataset")
        return tokenize_pairs(tokenizer, records[start:end], str(path), bad, template, cfg.system_prompt, start)

    # The tokenizer's own template is part of the tokenizer's fingerprint (cache.py).
    rendering = json.dumps({"template": cfg.template, "jinja": TEMPLATES[template].jinja if template else None,
                            "system_prompt": cfg.system_prompt, "rule": _TOKENIZE_RULE_VERSION}, sort_keys=True)
    whole = "whole file" if separate else "first 5%" if which == "validation" else "after the first 5%"
    return Source(f"{path} ({which}, {whole})", f"file:{file_digest(path)}:{which}:{separate}", rendering, read)
