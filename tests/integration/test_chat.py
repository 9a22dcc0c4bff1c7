"""chat_dataset: assistant-only labels checked token by token against independent references
(transformers' return_assistant_tokens_mask on a Llama 3 template marked with {% generation %};
Meta's Llama 2 chat format encoded with sentencepiece itself), on the real Alpaca records as
conversations and on a multi-turn fixture; packing vs padding; the cache key; bad records;
prompt_ids; and a fine-tune end to end."""
import json

import pytest
import sentencepiece
import torch
from transformers import AutoModelForCausalLM

from conftest import SHIM, check, error_lines, llama3_chat_tokenizer, read_metrics, run_cli, torchrun
from shardtune.config.parse import parse_args
from shardtune.data import build_split, chat, eval_loader, preference_pairs
from shardtune.data.records import BadRecords
from shardtune.data.tokenize import IGNORE_INDEX
from shardtune.errors import UserError
from shardtune.modeling.load import load_tokenizer
from shardtune.modeling.loss import token_loss_sum

SYSTEM = "You are a terse assistant. Answer in one sentence."
# Multi-turn, with a system prompt, text around the content that the templates trim, and
# newlines and digits inside an answer.
MULTI_TURN = [
    {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "  And its population?\n"},
        {"role": "assistant", "content": "About 2.1 million people\nlive in the city itself (2023)."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]},
    {"messages": [
        {"role": "user", "content": "Name two primes."},
        {"role": "assistant", "content": "2 and 3."},
    ]},
]


def sharegpt(record: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in record["messages"]]}


def alpaca_conversations(shared_data) -> list[dict]:
    """The real Alpaca records as conversations: user = instruction (+ input), assistant = output."""
    records = json.loads((shared_data / "alpaca" / "alpaca_data_200.json").read_text())
    return [{"messages": [
        {"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
        {"role": "assistant", "content": r["output"]},
    ]} for r in records]


def write_jsonl(path, records) -> str:
    """The library's writer (non-ASCII written raw, as users' files hold it); the path as a flag value."""
    preference_pairs.write_jsonl(path, records)
    return str(path)


def chat_args(data_path, *extra) -> list[str]:
    return ["--dataset", "chat_dataset", "--chat_dataset.data_path", str(data_path), *extra]


def read_split(data_path, tok, split="train", mode="error", *extra):
    cfg = parse_args(chat_args(data_path, *extra)).dataset
    return chat.source(cfg, split).read(tok, BadRecords(mode))


@pytest.fixture(scope="module")
def llama3_tok(llama3_chat_model):
    return load_tokenizer(str(llama3_chat_model))


def hf_assistant_labels(tok, record: dict) -> tuple[list[int], list[int]]:
    """transformers' own rendering and assistant mask (the template's {% generation %} blocks)."""
    out = tok.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return ids, [i if on else IGNORE_INDEX for i, on in zip(ids, out["assistant_masks"])]


def test_llama3_labels_equal_the_assistant_mask_token_by_token(tmp_path, shared_data, llama3_tok):
    conversations = alpaca_conversations(shared_data)
    path = write_jsonl(tmp_path / "alpaca_chat.jsonl", conversations)
    train, val = read_split(path, llama3_tok, "train"), read_split(path, llama3_tok, "validation")
    assert (len(val), len(train)) == (10, 190)  # validation = the first 5%
    for example, record in zip(val + train, conversations):
        ids, labels = hf_assistant_labels(llama3_tok, record)
        assert example["input_ids"] == ids and example["labels"] == labels
        trained = [i for i in example["labels"] if i != IGNORE_INDEX]
        assert llama3_tok.decode(trained) == record["messages"][1]["content"].strip() + "<|eot_id|>"

    fixture = MULTI_TURN + [sharegpt(r) for r in MULTI_TURN]  # ShareGPT records give the same examples
    examples = read_split(write_jsonl(tmp_path / "multi.jsonl", fixture * 10), llama3_tok)[-len(fixture):]
    for example, record in zip(examples, MULTI_TURN * 2):
        assert (example["input_ids"], example["labels"]) == hf_assistant_labels(llama3_tok, record)
    # every assistant turn of the multi-turn conversation is trained, each through its <|eot_id|>
    runs = [[]]
    for label in examples[0]["labels"]:
        if label == IGNORE_INDEX:
            runs[-1] and runs.append([])
        else:
            runs[-1].append(label)
    answers = [m["content"].strip() + "<|eot_id|>" for m in MULTI_TURN[0]["messages"] if m["role"] == "assistant"]
    assert [llama3_tok.decode(run) for run in runs if run] == answers


def meta_llama2_chat(sp, record: dict) -> tuple[list[int], list[int]]:
    """Meta's Llama 2 chat_completion format (llama/generation.py), encoded with sentencepiece:
    one encode per exchange, the system prompt inside the first [INST]."""
    messages = record["messages"]
    if messages[0]["role"] == "system":
        first = "<<SYS>>\n" + messages[0]["content"] + "\n<</SYS>>\n\n" + messages[1]["content"]
        messages = [{"role": "user", "content": first}] + messages[2:]
    ids, labels = [], []
    for user, answer in zip(messages[::2], messages[1::2]):
        prompt = sp.encode(f"[INST] {user['content'].strip()} [/INST]")
        exchange = sp.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ")
        assert exchange[: len(prompt)] == prompt  # the answer starts at a token boundary
        ids += [sp.bos_id(), *exchange, sp.eos_id()]
        labels += [IGNORE_INDEX] * (1 + len(prompt)) + exchange[len(prompt):] + [sp.eos_id()]
    return ids, labels


def test_llama2_template_for_a_tokenizer_without_one(tmp_path, shared_data):
    tokenizer_dir = shared_data / "tokenizers" / "llama2"
    tok = load_tokenizer(str(tokenizer_dir))
    assert tok.chat_template is None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    conversations = alpaca_conversations(shared_data)[:60] + MULTI_TURN
    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    examples = read_split(path, tok, "train", "error", "--chat_dataset.template", "llama2")
    assert len(examples) == len(conversations) - len(conversations) // 20
    for example, record in zip(examples, conversations[len(conversations) // 20:]):
        ids, labels = meta_llama2_chat(sp, record)
        assert example["input_ids"] == ids and example["labels"] == labels
    with pytest.raises(UserError, match="has no chat template; pass --chat_dataset.template"):
        read_split(path, tok)
    with pytest.raises(UserError, match="lacks the special tokens <|begin_of_text|>.* that the llama3"):
        read_split(path, tok, "train", "error", "--chat_dataset.template", "llama3")


def test_named_templates_llama3_and_chatml(tmp_path, llama3_tok):
    """--chat_dataset.template llama3 on a Llama 3 tokenizer without a template gives exactly what
    the tokenizer's own (Meta's) template gives; chatml trains through <|im_end|>, not the newline after."""
    path = write_jsonl(tmp_path / "multi.jsonl", MULTI_TURN * 10)
    own = read_split(path, llama3_tok)
    bare = llama3_chat_tokenizer(chat_template=False)
    assert read_split(path, bare, "train", "error", "--chat_dataset.template", "llama3") == own

    chatml_tok = llama3_chat_tokenizer(chat_template=False)
    chatml_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    example = read_split(path, chatml_tok, "train", "error", "--chat_dataset.template", "chatml")[-2]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content'].strip()}<|im_end|>\n" for m in MULTI_TURN[0]["messages"])
    assert example["input_ids"] == chatml_tok(text, add_special_tokens=False)["input_ids"]
    expected = []  # built segment by segment: the header and the newline after <|im_end|> are not trained
    for m in MULTI_TURN[0]["messages"]:
        head = chatml_tok(f"<|im_start|>{m['role']}\n", add_special_tokens=False)["input_ids"]
        body = chatml_tok(m["content"].strip() + "<|im_end|>", add_special_tokens=False)["input_ids"]
        newline = chatml_tok("\n", add_special_tokens=False)["input_ids"]
        expected += [IGNORE_INDEX] * len(head) + (body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body))
        expected += [IGNORE_INDEX] * len(newline)
    assert example["labels"] == expected


def test_json_and_parquet_read_like_jsonl(tmp_path, llama3_tok):
    """Both formats mixed in one file; parquet then holds both columns, one null per row."""
    import pyarrow as pa  # here, so that only this test needs it
    import pyarrow.parquet as pq

    records = (MULTI_TURN + [sharegpt(r) for r in MULTI_TURN]) * 10
    reference = read_split(write_jsonl(tmp_path / "chat.jsonl", records), llama3_tok)
    (tmp_path / "chat.json").write_text(json.dumps(records))
    columns = [{"messages": r.get("messages"), "conversations": r.get("conversations")} for r in records]
    pq.write_table(pa.Table.from_pylist(columns), tmp_path / "chat.parquet")
    assert read_split(tmp_path / "chat.json", llama3_tok) == reference
    assert read_split(tmp_path / "chat.parquet", llama3_tok) == reference


def test_train_on_input_and_the_cache_key(tmp_path, llama3_tok):
    path = write_jsonl(tmp_path / "multi.jsonl", MULTI_TURN * 20)

    def split(*extra):
        cfgs = parse_args(chat_args(path, "--data_cache_dir", str(tmp_path / "cache"), "--context_length", "512", *extra))
        data = build_split(cfgs, llama3_tok, "train")
        return data, [data.dataset[i]["labels"].tolist() for i in range(len(data.dataset))]

    assistant, labels = split()
    assert not assistant.stats.from_cache
    everything, all_labels = split("--chat_dataset.train_on_input", "True")
    assert not everything.stats.from_cache  # train_on_input is part of the key
    assert everything.stats.target_tokens == everything.stats.tokens - everything.stats.examples
    assert everything.stats.target_tokens > 2 * assistant.stats.target_tokens
    assert split()[0].stats.from_cache and split()[1] == labels  # same flags: loaded, same labels
    assert not split("--chat_dataset.system_prompt", "Be kind.")[0].stats.from_cache
    bare = llama3_chat_tokenizer(chat_template=False)  # another template is another key
    cfgs = parse_args(chat_args(path, "--data_cache_dir", str(tmp_path / "cache"), "--context_length", "512",
                                "--chat_dataset.template", "llama3"))
    assert not build_split(cfgs, bare, "train").stats.from_cache


@torch.no_grad()
def test_packing_and_padding_give_the_same_loss(tmp_path, shared_data, llama3_chat_model, llama3_tok):
    """The training loop's loss over the same conversations, packed or padded, equals plain
    transformers' loss on each example alone (labels shifted by the model itself)."""
    model = AutoModelForCausalLM.from_pretrained(llama3_chat_model, dtype=torch.float32).eval()
    path = write_jsonl(tmp_path / "chat.jsonl", alpaca_conversations(shared_data)[:12] + MULTI_TURN * 3)
    totals = {}
    for strategy in ("packing", "padding"):
        cfgs = parse_args(chat_args(path, "--batching_strategy", strategy, "--context_length", "2048",
                                    "--data_cache_dir", "none"))
        # batches of 3 that cover every sample once (the training sampler leaves a partial global batch out)
        loader = eval_loader(build_split(cfgs, llama3_tok, "train"), 3, 1, 0, llama3_tok.pad_token_id, 0)
        loss_sum, targets = 0.0, 0
        for batch in loader:
            loss_sum += token_loss_sum(model, batch, torch.device("cpu")).item()
            targets += batch["num_targets"]
        totals[strategy] = (loss_sum, targets)
    reference_sum, reference_targets = 0.0, 0
    for example in read_split(path, llama3_tok):
        labels = torch.tensor([example["labels"]])
        n = int((labels[0, 1:] != IGNORE_INDEX).sum())
        reference_sum += model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss.item() * n
        reference_targets += n
    assert totals["packing"][1] == totals["padding"][1] == reference_targets
    for loss_sum, targets in totals.values():
        assert abs(loss_sum / targets - reference_sum / reference_targets) <= 1e-5


GOOD = MULTI_TURN[1]
# (bad record, what the error says); each is record 1 of its file
BAD = {
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"}, GOOD["messages"][1]]}, "turn 0: role 'bot' is not one of"),
    "unknown ShareGPT role": ({"conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "x"}]},
                              "turn 0: from 'user' is not one of system, human, gpt"),
    "empty turn": ({"messages": [GOOD["messages"][0], {"role": "assistant", "content": "  "}]}, "turn 1: empty content"),
    "content not a string": ({"messages": [GOOD["messages"][0], {"role": "assistant", "content": 5}]},
                             "turn 1: content must be a string, got int"),
    "turns not a list": ({"messages": "hello"}, "expected a non-empty list of turns, got str"),
    "no assistant turn": ({"messages": [GOOD["messages"][0]]}, "no assistant turn"),
    "late system turn": ({"messages": [*GOOD["messages"], {"role": "system", "content": "x"}]},
                         "turn 2: a system turn may only come first"),
    "no messages field": ({"text": "hi"}, "missing field 'messages'"),
    "special token in content": ({"messages": [GOOD["messages"][0], {"role": "assistant", "content": "a<|eot_id|>b"}]},
                                 "turn 1 contains the special token '<|eot_id|>'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_is_named_then_skipped(case, tmp_path, llama3_tok):
    record, needle = BAD[case]
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, record] + [GOOD] * 40)
    with pytest.raises(UserError) as err:
        read_split(path, llama3_tok, "validation")  # records 0 and 1
    assert f"{path}: record 1: {needle}" in str(err.value)
    bad = BadRecords("skip")
    cfg = parse_args(chat_args(path)).dataset
    assert len(chat.source(cfg, "validation").read(llama3_tok, bad)) == 1 and bad.count == 1


def test_skip_counts_every_bad_record_of_a_split(tmp_path, shared_data):
    """llama2's template refuses roles that do not alternate; skip mode counts it with the others."""
    tok = load_tokenizer(str(shared_data / "tokenizers" / "llama2"))
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}
    records = [GOOD] * 20 + [two_users, BAD["empty turn"][0], BAD["unknown role"][0]] + [GOOD] * 20
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(UserError, match=r"record 20: --chat_dataset.template llama2 rejects it: roles must alternate"):
        read_split(path, tok, "train", "error", "--chat_dataset.template", "llama2")
    cfgs = parse_args(chat_args(path, "--chat_dataset.template", "llama2", "--on_bad_record", "skip",
                                "--data_cache_dir", "none", "--context_length", "256"))
    split = build_split(cfgs, tok, "train")
    assert split.stats.bad_records == 3 and split.stats.examples == len(records) - len(records) // 20 - 3


def test_prompt_ids_open_the_assistant_turn(tmp_path, llama3_tok, shared_data):
    """prompt_ids is the training rendering up to where the last assistant answer starts."""
    record = MULTI_TURN[0]
    (example,) = read_split(write_jsonl(tmp_path / "one.jsonl", [record]), llama3_tok, "train")
    first_of_last_answer = max(i for i, l in enumerate(example["labels"])
                               if l != IGNORE_INDEX and example["labels"][i - 1] == IGNORE_INDEX)
    ids = chat.prompt_ids(llama3_tok, record["messages"][:-1])
    assert ids == example["input_ids"][:first_of_last_answer]
    assert ids == llama3_tok.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
    llama2 = load_tokenizer(str(shared_data / "tokenizers" / "llama2"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / "llama2" / "tokenizer.model"))
    question = [{"role": "user", "content": "Name two primes."}]
    assert chat.prompt_ids(llama2, question, "llama2", system_prompt=SYSTEM) == [
        sp.bos_id(), *sp.encode(f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nName two primes. [/INST]")]
    with pytest.raises(UserError, match="turn 0: role 'robot'"):
        chat.prompt_ids(llama3_tok, [{"role": "robot", "content": "x"}])


def test_chat_fine_tune_end_to_end(tmp_path, shared_data, llama3_chat_model, capfd):
    """A full fine-tune (the data stage is the same for every method) on conversations, 2
    FSDP2 ranks under torchrun; a bad record stops it first with one line naming the file
    and record."""
    records = alpaca_conversations(shared_data)[:60] + MULTI_TURN * 10
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "out"
    args = ["--model_name", str(llama3_chat_model), "--num_workers_dataloader", "0",
            "--batch_size_training", "2", "--context_length", "512", "--num_epochs", "1", "--max_train_step", "4",
            "--max_eval_step", "2", "--lr", "2e-3", "--save_metrics", "--log_every", "1", "--output_dir", str(out)]
    bad_path = write_jsonl(tmp_path / "bad.jsonl", records + [BAD["empty turn"][0]])
    code, _, err = run_cli(capfd, ["finetune", *chat_args(bad_path), *args])  # in this process
    assert code != 0 and "Traceback" not in err
    assert [f"{bad_path}: record {len(records)}: turn 1: empty content" in line
            for line in error_lines(err)] == [True], err
    check(torchrun(2, SHIM, chat_args(path) + args + ["--enable_fsdp"]))
    steps, epochs = read_metrics(out)
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert epochs[0]["eval_loss"] is not None and (out / "model.safetensors").is_file()
