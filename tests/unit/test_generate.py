"""`shardtune generate` on tiny models: a trained LoRA adapter and its merged model give the
same greedy text as plain peft/transformers; sampling is reproducible from its seed; the
llama_adapter and prefix adapters load and generate as in plain peft; --input JSON lines
become JSON lines; prompts equal the training prompts; bad input is one line."""
import json

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import error_lines, plain_greedy, run_cli
from shardtune.checkpoint.convert import merge
from shardtune.config.schema import alpaca_dataset, grammar_dataset, samsum_dataset
from shardtune.data import alpaca, grammar, samsum
from shardtune.data.records import BadRecords
from shardtune.data.templates import TEMPLATES
from shardtune.commands.evaluate import prompt_and_target
from shardtune.modeling.load import load_tokenizer

NEW = 24  # max_new_tokens: enough text to tell models apart, cheap on a tiny model


def _samsum_prompt_ids(tokenizer, dialogue: str) -> list[int]:
    # llama-recipes' prompt, written out here rather than imported from shardtune
    text = tokenizer.bos_token + f"Summarize this dialog:\n{dialogue}\n---\nSummary:\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _dialogues(shared_data, n: int) -> list[str]:
    return [r["dialogue"] for r in json.loads((shared_data / "samsum" / "test.json").read_text())[:n]]


def _generate(capsys, *args) -> str:
    code, out, err = run_cli(capsys, ["generate", "--max_new_tokens", NEW, *args])
    assert code == 0, err
    return out.rstrip("\n")


def test_lora_and_merged_greedy_match_plain_peft(capsys, tmp_path, tiny_model, tiny_lora, shared_data):
    dialogue = _dialogues(shared_data, 1)[0]
    with_adapter = _generate(capsys, "--model_name", tiny_model, "--peft_model", tiny_lora, "--prompt", dialogue)
    again = _generate(capsys, "--peft_model", tiny_lora, "--prompt", dialogue)  # base read from the adapter
    merged_dir = merge(str(tiny_model), str(tiny_lora), str(tmp_path / "merged"))
    merged = _generate(capsys, "--model_name", merged_dir, "--prompt", dialogue)
    base = _generate(capsys, "--model_name", tiny_model, "--prompt", dialogue)

    tokenizer = load_tokenizer(str(tiny_model))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_lora).eval()
    reference = plain_greedy(peft_model, tokenizer, _samsum_prompt_ids(tokenizer, dialogue), NEW)
    assert with_adapter and with_adapter == again == merged == reference
    assert base != with_adapter  # the adapter was applied


def test_sampling_is_reproducible_from_its_seed(capsys, tiny_model, tiny_lora):
    flags = ["--model_name", tiny_model, "--peft_model", tiny_lora, "--prompt", "Amy: pizza tonight?\nBob: sure!",
             "--temperature", "1.0", "--top_p", "0.95"]
    first = _generate(capsys, *flags, "--seed", "1")
    assert _generate(capsys, *flags, "--seed", "1") == first
    assert _generate(capsys, *flags, "--seed", "2") != first


def test_input_jsonl_to_jsonl(capsys, tmp_path, tiny_model, tiny_lora, shared_data):
    records = [{"id": i, "dialogue": d} for i, d in enumerate(_dialogues(shared_data, 3))]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    _generate(capsys, "--peft_model", tiny_lora, "--input", src, "--output", dst)
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "generated"} for line in lines] == records
    # each record's completion is what --prompt gives for it alone
    alone = _generate(capsys, "--peft_model", tiny_lora, "--prompt", records[2]["dialogue"])
    assert lines[2]["generated"] == alone and all(line["generated"] for line in lines)


def _noisy_adapter(tiny_model, method: str):
    """A peft model of that method whose adapter weights are moved well away from their
    init (llama_adapter's zero-init gate makes a fresh one a no-op)."""
    config = {"llama_adapter": AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"),
              "prefix": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")}[method]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(3 * torch.randn_like(p))
    return model.eval()


def _forward_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding by plain forward passes over the whole sequence: the reference that
    needs no KV cache."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, len(prompt_ids):], skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["llama_adapter", "prefix"])
def test_other_adapters_generate_like_plain_peft(capsys, tmp_path, tiny_model, method):
    model = _noisy_adapter(tiny_model, method)
    model.save_pretrained(tmp_path / method)
    tokenizer = load_tokenizer(str(tiny_model))
    dialogue = "Amy: pizza tonight?\nBob: sure!"
    reference = _forward_greedy(model, tokenizer, _samsum_prompt_ids(tokenizer, dialogue), NEW)
    out = _generate(capsys, "--model_name", tiny_model, "--peft_model", tmp_path / method, "--prompt", dialogue)
    assert out == reference
    assert out != _generate(capsys, "--model_name", tiny_model, "--prompt", dialogue)


def test_generate_still_drops_the_prefix(tiny_model):
    """transformers' generate() ignores a prefix adapter's KV prefix (transformers 5.24, peft
    0.21), which is why shardtune decodes prefix models with plain forwards. When this
    fails, generate() applies the prefix: remove generate._decode_without_cache."""
    model = _noisy_adapter(tiny_model, "prefix")
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[1, 300, 301, 302, 303]])
    with torch.no_grad():
        first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                               output_scores=True, return_dict_in_generate=True).scores[0][0]
        with_prefix = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        without = base(input_ids=ids).logits[0, -1]
    assert (with_prefix - without).abs().max() > 1e-2  # the prefix matters in a forward
    assert torch.allclose(first, without, atol=1e-4), "generate() now applies the prefix: drop _decode_without_cache"


def test_templates_are_the_training_prompts(tmp_path, tiny_llama2_tok, shared_data):
    tokenizer = load_tokenizer(str(tiny_llama2_tok))
    csv = tmp_path / "grammar.csv"
    src = (shared_data / "jfleg" / "test" / "test.src").read_text().splitlines()[:3]
    ref = (shared_data / "jfleg" / "test" / "test.ref0").read_text().splitlines()[:3]
    csv.write_text("input,target\n" + "".join(f'"{s}","{r}"\n' for s, r in zip(src, ref)))
    cases = {
        "samsum": (samsum.source(samsum_dataset(data_path=str(shared_data / "samsum")), "test"),
                   json.loads((shared_data / "samsum" / "test.json").read_text())[:3]),
        "grammar": (grammar.source(grammar_dataset(), str(csv)), [{"input": s} for s in src]),
        # the validation split: the first 10 records, with and without an input
        "alpaca": (alpaca.source(alpaca_dataset(data_path=str(shared_data / "alpaca" / "alpaca_data_200.json")), "val"),
                   json.loads((shared_data / "alpaca" / "alpaca_data_200.json").read_text())[:10]),
    }
    for name, (source, records) in cases.items():
        trained = source.read(tokenizer, BadRecords())[:len(records)]
        for example, record in zip(trained, records, strict=True):
            assert TEMPLATES[name].encode(tokenizer, record) == prompt_and_target(example)[0], name


def test_bad_input_is_one_line(capsys, tmp_path, tiny_model):
    cases = {
        "invalid JSON": ('{"dialogue": "A: hi"}\n{"dialogue": \n', "record 1 (line 2)"),
        "missing field": ('{"dialogue": "A: hi"}\n{"text": "A: hi"}\n', "record 1: missing field 'dialogue'"),
        "wrong type": ('{"dialogue": 7}\n', "record 0: field 'dialogue' must be a string"),
    }
    for what, (content, expected) in cases.items():
        path = tmp_path / "in.jsonl"
        path.write_text(content)
        code, out, err = run_cli(capsys, ["generate", "--model_name", tiny_model, "--input", path])
        assert code == 2 and out == "", what
        [line] = error_lines(err)  # one line (peft's imports may print warnings before it)
        assert str(path) in line and expected in line and "Traceback" not in err, err
    code, _, err = run_cli(capsys, ["generate", "--model_name", tiny_model, "--input", tmp_path / "missing.jsonl"])
    assert code == 2 and len(error_lines(err)) == 1 and "missing.jsonl does not exist" in err
    code, _, err = run_cli(capsys, ["generate", "--model_name", tmp_path / "nowhere", "--prompt", "hi"])
    assert code == 2 and len(error_lines(err)) == 1 and "nowhere" in err


def test_chat_template_renders_as_transformers_does(capsys, tmp_path, llama3_chat_model):
    """--template chat: the prompt is the tokenizer's own chat template with the assistant turn
    opened (apply_chat_template, independently of shardtune), for --prompt and --input."""
    tokenizer = load_tokenizer(str(llama3_chat_model))
    model = AutoModelForCausalLM.from_pretrained(llama3_chat_model).eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reference_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
    reference = plain_greedy(model, tokenizer, list(reference_ids), NEW)
    single_ids = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    assert _generate(capsys, "--model_name", llama3_chat_model, "--template", "chat", "--prompt",
                     "Name a colour.") == plain_greedy(model, tokenizer, list(single_ids), NEW)

    source = tmp_path / "chats.jsonl"
    source.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"id": 7}) + "\n")
    code, _, err = run_cli(capsys, ["generate", "--model_name", llama3_chat_model, "--template", "chat",
                                    "--input", source])
    assert code != 0 and len(error_lines(err)) == 1 and "record 1" in error_lines(err)[0]
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, ["generate", "--model_name", llama3_chat_model, "--template", "chat",
                                    "--input", source, "--output", out, "--on_bad_record", "skip",
                                    "--max_new_tokens", NEW])
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["generated"] for row in rows] == [reference]
