"""chat_dataset: conversations rendered with a chat template, trained on the assistant turns.

A record is `{"messages": [{"role", "content"}, ...]}` (OpenAI style: system/user/assistant)
or `{"conversations": [{"from", "value"}, ...]}` (ShareGPT: system/human/gpt). It is rendered
with the tokenizer's own chat template, or with --chat_dataset.template llama3|llama2|chatml,
through transformers' `apply_chat_template`, and tokenized as one text.

Labels: only the assistant turns are trained, each from the end of its header (what
`add_generation_prompt` writes) through its end-of-turn token (the last special token the
template writes in that turn: <|eot_id|>, </s>, <|im_end|>, ...). The spans are found by
rendering the conversation's prefixes, so any template works that renders turn by turn
without rewriting earlier turns; token offsets then map the character spans to tokens, and
a token that straddles a span boundary makes the record bad instead of being guessed.
--chat_dataset.train_on_input True trains every token.

Splits: validation is the first 5% of data_path (int(n / 20) records) and training the rest,
unless --chat_dataset.validation_path names a separate file (then all of data_path trains).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jinja2 import TemplateError

from ..errors import UserError
from .chat_templates import TEMPLATES
from .records import BadRecords, read_records, where
from .source import Source, data_size, file_digest, sliced
from .tokenize import IGNORE_INDEX, Example

OWN_TEMPLATE = "tokenizer"  # --chat_dataset.template default: the tokenizer's own chat template
TEMPLATE_CHOICES = (OWN_TEMPLATE, *TEMPLATES)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# Bumped when rendering or labelling changes, so cached splits are rebuilt.
_LABEL_RULE_VERSION = 1
_TRAIN, _EVAL = ("train",), ("validation", "val", "eval", "test")


class BadConversation(ValueError):
    """A record that is not a usable conversation; the message says why."""


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def _turns(turns, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise BadConversation(f"expected a non-empty list of turns, got {_type_name(turns)}")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadConversation(f"turn {j}: expected an object with {role_key!r} and {content_key!r}, "
                                  f"got {_type_name(turn)}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise BadConversation(f"turn {j}: {role_key} {role!r} is not one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise BadConversation(f"turn {j}: {content_key} must be a string, got {_type_name(content)}")
        if not content.strip():
            raise BadConversation(f"turn {j}: empty {content_key}")
        if roles[role] == "system" and j > 0:
            raise BadConversation(f"turn {j}: a system turn may only come first")
        out.append(Message(roles[role], content))
    return out


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def parse_conversation(record) -> list[Message]:
    """The messages of one record in either format, checked; raises BadConversation."""
    if not isinstance(record, dict):
        raise BadConversation(f"expected an object with 'messages' or 'conversations', got {_type_name(record)}")
    if record.get("messages") is not None:
        return _turns(record["messages"], "role", "content", {r: r for r in ROLES})
    if record.get("conversations") is not None:
        return _turns(record["conversations"], "from", "value", SHAREGPT_ROLES)
    raise BadConversation("missing field 'messages' (or ShareGPT's 'conversations')")


class ChatRenderer:
    """One tokenizer with one chat template: renders conversations, finds the assistant spans."""

    def __init__(self, tokenizer, template: Optional[str] = None, flag: str = "--chat_dataset.template") -> None:
        # flag: the template option of the dataset being read, for messages
        self.tokenizer, self.flag = tokenizer, flag
        self.name = f"{flag} {template}" if template else "the tokenizer's chat template"
        if template is None:
            if not tokenizer.chat_template:
                raise UserError(f"the tokenizer has no chat template; pass {flag} "
                                f"{'|'.join(TEMPLATES)} to choose one")
            self.jinja = None  # apply_chat_template uses the tokenizer's own
        else:
            if template not in TEMPLATES:
                raise UserError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
            chosen = TEMPLATES[template]
            self._require_special_tokens(template, chosen.special_tokens)
            if chosen.uses_bos_eos and not (tokenizer.bos_token and tokenizer.eos_token):
                raise UserError(f"the {template} chat template needs the tokenizer's bos and eos tokens, "
                                f"and this tokenizer lacks one; choose another {self.flag}")
            self.jinja = chosen.jinja
        # Every special token string; content holding one would be read as template markup.
        self.special_tokens = sorted({tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special}
                                     | set(tokenizer.all_special_tokens))

    def _require_special_tokens(self, template: str, needed: tuple[str, ...]) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [tok for tok in needed
                   if tok not in vocab or self.tokenizer.encode(tok, add_special_tokens=False) != [vocab[tok]]]
        if missing:
            raise UserError(f"the tokenizer lacks the special tokens {', '.join(missing)} that the {template} "
                            "chat template writes; use the tokenizer of a model trained with that format, "
                            f"or choose another {self.flag}")

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [m.as_dict() for m in messages], chat_template=self.jinja, tokenize=False,
                add_generation_prompt=generation_prompt)
        except TemplateError as err:  # the template's raise_exception: it rejects this conversation
            raise BadConversation(f"{self.name} rejects it: {err}") from None

    def check_content(self, messages: list[Message]) -> None:
        for j, message in enumerate(messages):
            for special in self.special_tokens:
                if special in message.content:
                    raise BadConversation(f"turn {j} contains the special token {special!r}, which the "
                                          "tokenizer would read as chat markup; remove it from the text")

    def assistant_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """[start, end) character spans of `text` (the whole rendering) to train: each assistant
        turn after its header, through its last special token (the end of turn)."""
        spans = []
        for k, message in enumerate(messages):
            if message.role != "assistant":
                continue
            head = self.render(messages[:k], generation_prompt=True)
            through = self.render(messages[: k + 1])
            if not (text.startswith(through) and through.startswith(head)):
                raise UserError(
                    f"{self.name} does not render a conversation turn by turn (turn {k} changes the text "
                    f"before it), so the assistant turns cannot be located; pass {self.flag} "
                    f"{'|'.join(TEMPLATES)}")
            turn = through[len(head):]
            end_of_turn = max((turn.rfind(special) + len(special) for special in self.special_tokens if special in turn),
                              default=len(turn))
            spans.append((len(head), len(head) + end_of_turn))
        return spans


def labels_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (its character offsets), whether it lies inside a span; raises
    BadConversation when a token straddles a span boundary."""
    trained = []
    for start, end in offsets:
        inside = any(a <= start and end <= b for a, b in spans)
        straddles = any(start < edge < end for span in spans for edge in span)
        if straddles:
            raise BadConversation("a token crosses the boundary of an assistant turn (the tokenizer merges the "
                                  "template's header or end-of-turn with the text), so its label is ambiguous")
        trained.append(inside)
    return trained


def tokenize_conversations(tokenizer, records: list, source: str, bad: BadRecords, template: Optional[str],
                           train_on_input: bool = False, system_prompt: str = "", start: int = 0) -> list[Example]:
    """Examples of the good records; bad ones go to `bad` named by `source` and record index."""
    if not tokenizer.is_fast:
        raise UserError("chat_dataset needs a fast tokenizer (a tokenizer.json) for token offsets")
    renderer = ChatRenderer(tokenizer, template)
    texts, spans, kept = [], [], []
    for i, record in enumerate(records, start=start):
        if record is None:
            continue  # unreadable, already reported
        try:
            messages = parse_conversation(record)
            if system_prompt and messages[0].role != "system":
                messages = [Message("system", system_prompt), *messages]
            renderer.check_content(messages)
            if not any(m.role == "assistant" for m in messages):
                raise BadConversation("no assistant turn, so nothing to train")
            text = renderer.render(messages)
            spans.append(None if train_on_input else renderer.assistant_spans(messages, text))
        except BadConversation as err:
            bad.report(f"{where(source, i)}: {err}")
            continue
        texts.append(text)
        kept.append(i)
    if not texts:
        return []
    # The template writes bos and every other special token itself.
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, record_spans, i in zip(encoded["input_ids"], encoded["offset_mapping"], spans, kept):
        if record_spans is None:
            examples.append({"input_ids": ids, "labels": list(ids)})
            continue
        try:
            trained = labels_from_spans(offsets, record_spans)
        except BadConversation as err:
            bad.report(f"{where(source, i)}: {err}")
            continue
        examples.append({"input_ids": ids, "labels": [tok if on else IGNORE_INDEX for tok, on in zip(ids, trained)]})
    return examples


def prompt_ids(tokenizer, messages: list[dict], template: Optional[str] = None, system_prompt: str = "") -> list[int]:
    """Token ids of a conversation rendered for generation: every turn, then the assistant
    header opened (add_generation_prompt), as the model saw it in training. `template` is
    llama3|llama2|chatml, or None for the tokenizer's own; messages are OpenAI-style dicts."""
    try:
        parsed = parse_conversation({"messages": messages})
    except BadConversation as err:
        raise UserError(f"the chat messages are not a conversation: {err}") from None
    if system_prompt and parsed[0].role != "system":
        parsed = [Message("system", system_prompt), *parsed]
    renderer = ChatRenderer(tokenizer, template)
    try:
        text = renderer.render(parsed, generation_prompt=True)
    except BadConversation as err:
        raise UserError(f"the chat messages are not a conversation: {err}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_bounds(num_records: int, split: str, separate_validation: bool,
                 dataset: str = "chat_dataset") -> tuple[int, int]:
    """[start, end) of a split within its file (chat_dataset's rule, shared by preference_dataset)."""
    if split in _TRAIN:
        return (0 if separate_validation else num_records // 20), num_records
    if split in _EVAL:
        return 0, (num_records if separate_validation else num_records // 20)
    raise UserError(f"unknown {dataset} split {split!r}; use train or validation")


def split_role(split: str, dataset: str = "chat_dataset") -> str:
    """"train" or "validation": which of split_bounds' two parts a split name selects."""
    split_bounds(0, split, False, dataset)  # rejects an unknown name
    return "train" if split in _TRAIN else "validation"


def source(dataset_config, split: str) -> Source:
    cfg = dataset_config
    if not cfg.data_path:
        raise UserError("chat_dataset needs its data: pass --chat_dataset.data_path FILE (.jsonl, .json, .parquet or .arrow) or a directory of them")
    if cfg.template not in TEMPLATE_CHOICES:
        raise UserError(f"unknown --chat_dataset.template {cfg.template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
    split_bounds(0, split, False)  # reject an unknown split name before anything is read
    separate = bool(cfg.validation_path)
    which = "train" if split in _TRAIN else "validation"
    path = Path(cfg.validation_path if separate and which == "validation" else cfg.data_path).expanduser()
    if not path.exists():
        raise UserError(f"chat data {path} does not exist; check --chat_dataset.data_path / validation_path")
    template = None if cfg.template == OWN_TEMPLATE else cfg.template

    def records(bad: BadRecords) -> tuple[list, int]:
        records = read_records(path, bad)
        start, end = split_bounds(len(records), split, separate)
        return records[start:end], start

    def tokenize(tokenizer, recs: list, bad: BadRecords, start: int) -> list[Example]:
        return tokenize_conversations(tokenizer, recs, str(path), bad, template, cfg.train_on_input,
                                      cfg.system_prompt, start=start)

    # The tokenizer's own template is part of the tokenizer's fingerprint (cache.py).
    rendering = json.dumps({"template": cfg.template, "jinja": TEMPLATES[template].jinja if template else None,
                            "train_on_input": cfg.train_on_input, "system_prompt": cfg.system_prompt,
                            "label_rule": _LABEL_RULE_VERSION}, sort_keys=True)
    whole = "whole file" if separate else "first 5%" if which == "validation" else "after the first 5%"
    return sliced(f"{path} ({which}, {whole})", f"file:{file_digest(path)}:{which}:{separate}", rendering,
                  records, tokenize, size=data_size(path))
