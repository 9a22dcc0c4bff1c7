"""Bad input: one line on stderr, non-zero exit, no traceback."""
import json
import shutil

import pytest

from conftest import SHIM, error_lines, python, run_cli


def _assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("shardtune: error:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]


def _bad_samsum_dir(tmp_path, train_text):
    d = tmp_path / "samsum"
    d.mkdir()
    (d / "train.json").write_text(train_text)
    (d / "val.json").write_text('[{"id": "1", "dialogue": "A: hi", "summary": "A says hi."}]')
    return d


BASE = ["--use_peft", "--peft_method", "lora", "--max_train_step", "1", "--num_workers_dataloader", "0"]


def _samsum(make_dir):
    """Flags that train on the samsum directory make_dir(tmp_path) builds."""
    return lambda tmp_path, tiny_model: ["--samsum_dataset.data_path", str(make_dir(tmp_path))]


def _only_train(tmp_path):
    d = tmp_path / "only_train"
    d.mkdir()
    (d / "train.json").write_text('[{"id": "1", "dialogue": "A: hi", "summary": "A says hi."}]')
    return d


# In this process, through the command line's own entry point (`shardtune finetune`); the
# exit code and the one stderr line are what a shell sees (test_debug_shows_the_traceback
# runs the real process).
CLI_FAILURES = {
    "missing_model_dir": (lambda tmp_path, tiny_model: ["--model_name", str(tmp_path / "nope")], "does not exist"),
    "missing_data_dir": (_samsum(lambda tmp_path: tmp_path / "missing"), "does not exist"),
    "missing_val_file": (_samsum(_only_train), "no val.json"),
    "empty_split": (_samsum(lambda tmp_path: _bad_samsum_dir(tmp_path, "[]")), "the train split has no usable examples"),
    "malformed_json": (_samsum(lambda tmp_path: _bad_samsum_dir(
        tmp_path, '[{"id": "1", "dialogue": "A: hi", "summary": "ok"},\n {"id": "2", "dialogue": ')),
        "train.json: invalid JSON at line 2"),
    "missing_field": (_samsum(lambda tmp_path: _bad_samsum_dir(
        tmp_path, '[{"id": "1", "dialogue": "A: hi", "summary": "ok"}, {"id": "2", "dialogue": "B: yo"}]')),
        "train.json: record 1: missing field 'summary'"),
    "unknown_dataset": (lambda tmp_path, tiny_model: ["--dataset", "imagenet_dataset"], "unknown dataset 'imagenet_dataset'"),
    "fsdp_without_torchrun": (lambda tmp_path, tiny_model: ["--enable_fsdp"], "needs a distributed launch"),
    "unknown_peft_method": (lambda tmp_path, tiny_model: ["--use_peft", "--peft_method", "adalora"],
                            "unknown --peft_method 'adalora'"),
    "flag_type": (lambda tmp_path, tiny_model: ["--lr", "abc"], "expects a value of type float"),
    "misspelt_flag": (lambda tmp_path, tiny_model: ["--enable_fsdpp"], "did you mean --enable_fsdp"),
}


@pytest.mark.parametrize("case", list(CLI_FAILURES))
def test_command_line_failure_is_one_line(case, tmp_path, tiny_model, capfd):
    make, needle = CLI_FAILURES[case]
    argv = BASE + ["--model_name", str(tiny_model), "--output_dir", str(tmp_path / "o")] + make(tmp_path, tiny_model)
    code, _, err = run_cli(capfd, ["finetune", *argv])
    assert code != 0 and "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err


def test_error_line_is_one_write(monkeypatch):
    """Ranks share an unbuffered stderr: a line written in two pieces (text, then newline)
    can interleave with another rank's line, as it did in CI."""
    from shardtune.errors import UserError, exit_on_user_error

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass

    stderr = Recorder()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    @exit_on_user_error
    def fails():
        raise UserError("bad value; fix it")

    assert fails() == 2
    import socket

    assert stderr.writes == [f"shardtune: error: [rank 1 on {socket.gethostname()}] bad value; fix it\n"]


# ---- each failure the issue listed, in-process (fast: no interpreter start per case) -------

def _damaged_model(tmp_path, tiny_model, damage) -> list[str]:
    """A copy of the tiny model's config and tokenizer with its weights damaged by `damage(dir)`."""
    model = tmp_path / "damaged"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    damage(model, (tiny_model / "model.safetensors").read_bytes())
    return ["--model_name", str(model)]


def _truncated(model, weights):
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])


def _index_not_json(model, weights):
    (model / "model-00001-of-00001.safetensors").write_bytes(weights)
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"model.embed_tokens.weight": ')


def _index_names_missing_shard(model, weights):
    (model / "model-00001-of-00002.safetensors").write_bytes(weights)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))


def _damaged_adapter(tmp_path, tiny_model) -> list[str]:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 7)  # shorter than a header length
    return ["--from_peft_checkpoint", str(adapter)]


def _tokenizer_without_pad_or_eos(tmp_path, tiny_model) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.eos_token = tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    return ["--tokenizer_name", str(tmp_path / "tok")]


def _non_utf8_yaml(tmp_path, tiny_model) -> list[str]:
    (tmp_path / "c.yaml").write_bytes("lr: 0.001\nseed: 7 # r\u00e9sum\u00e9\n".encode("latin-1"))
    return ["--config", str(tmp_path / "c.yaml")]


CUSTOM_FILES = {
    "raises": "def get_custom_dataset(dataset_config, tokenizer, split):\n    raise RuntimeError('no table dialogues')\n",
    "syntax": "def get_custom_dataset(dataset_config, tokenizer, split)\n    return []\n",
    "import": "import not_a_module_anywhere\n",
    "collator": ("def get_custom_dataset(dataset_config, tokenizer, split):\n"
                 "    return [{'input_ids': [1, 5, 6, 2], 'labels': [-100, 5, 6, 2]}] * 8\n"
                 "def get_data_collator(tokenizer):\n"
                 "    return lambda items: {'input_ids': items['input_ids']}\n"),
}


def _custom(kind):
    def make(tmp_path, tiny_model) -> list[str]:
        path = tmp_path / f"custom_{kind}.py"
        path.write_text(CUSTOM_FILES[kind])
        return ["--dataset", "custom_dataset", "--custom_dataset.file", str(path)]
    return make


def _flags(*flags):
    return lambda tmp_path, tiny_model: list(flags)


FAILURES = {
    # name: (make extra flags (tmp_path, tiny_model) -> argv, what the one error line names)
    "val_batch_size_0": (_flags("--val_batch_size", "0"), "--val_batch_size"),
    "negative_workers": (_flags("--num_workers_dataloader", "-1"), "--num_workers_dataloader"),
    "negative_clip": (_flags("--gradient_clipping", "--gradient_clipping_threshold", "-1"), "--gradient_clipping_threshold"),
    "zero_clip": (_flags("--gradient_clipping", "--gradient_clipping_threshold", "0"), "--gradient_clipping_threshold"),
    "negative_freeze": (_flags("--use_peft", "False", "--freeze_layers", "--num_freeze_layers", "-1"), "--num_freeze_layers"),
    "lora_r_0": (_flags("--lora_config.r", "0"), "--lora_config.r"),
    "lora_bias": (_flags("--lora_config.bias", "some"), "--lora_config.bias"),
    "lora_task_type": (_flags("--lora_config.task_type", "CAUSAL"), "task type"),
    "lora_no_targets": (_flags("--lora_config.target_modules", ""), "--lora_config.target_modules"),
    "lora_unknown_target": (_flags("--lora_config.target_modules", "qq_proj"), "qq_proj"),
    "lora_dropout": (_flags("--lora_config.lora_dropout", "1.5"), "--lora_config.lora_dropout"),
    "truncated_weights": (lambda tmp, tiny: _damaged_model(tmp, tiny, _truncated), "model.safetensors"),
    "index_not_json": (lambda tmp, tiny: _damaged_model(tmp, tiny, _index_not_json), "model.safetensors.index.json"),
    "index_missing_shard": (lambda tmp, tiny: _damaged_model(tmp, tiny, _index_names_missing_shard),
                            "model-00002-of-00002.safetensors"),
    "damaged_adapter": (_damaged_adapter, "adapter_model.safetensors"),
    "tokenizer_without_pad_or_eos": (_tokenizer_without_pad_or_eos, "neither a pad nor an eos"),
    "non_utf8_yaml": (_non_utf8_yaml, "c.yaml"),
    "custom_raises": (_custom("raises"), "custom_raises.py: get_custom_dataset"),
    "custom_syntax": (_custom("syntax"), "custom_syntax.py"),
    "custom_import": (_custom("import"), "ModuleNotFoundError"),
    "custom_collator": (_custom("collator"), "custom_collator.py"),
}


def _fail_in_process(argv, capfd):
    from shardtune.recipes.sft import main

    code = main(argv)
    err = capfd.readouterr().err
    return code, err


@pytest.mark.parametrize("case", list(FAILURES))
def test_failure_is_one_line(case, tmp_path, tiny_model, capfd):
    make, needle = FAILURES[case]
    argv = BASE + ["--model_name", str(tiny_model), "--output_dir", str(tmp_path / "o"), "--context_length", "256",
                   "--batch_size_training", "1"] + make(tmp_path, tiny_model)
    code, err = _fail_in_process(argv, capfd)
    assert code != 0
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err


def test_vocab_larger_than_embedding(tmp_path, tiny_model, shared_data, capfd):
    llama2 = shared_data / "tokenizers" / "llama2"  # 32000 tokens; the tiny model's embedding has 1024 rows
    argv = BASE + ["--model_name", str(tiny_model), "--output_dir", str(tmp_path / "o"), "--tokenizer_name", str(llama2)]
    code, err = _fail_in_process(argv, capfd)
    assert code != 0 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and "32000 tokens" in lines[0], err


def test_debug_shows_the_traceback(tmp_path, tiny_model):
    """The same failure through the real command line: one line, and with --debug the traceback
    too, down to the user's own code that raised."""
    argv = BASE + ["--model_name", str(tiny_model), "--output_dir", str(tmp_path / "o")] + _custom("raises")(tmp_path, tiny_model)
    plain = python(SHIM, argv)
    _assert_one_line_error(plain, "no table dialogues")
    debug = python(SHIM, argv + ["--debug"])
    assert debug.returncode == plain.returncode != 0
    assert "Traceback" in debug.stderr and "raise RuntimeError('no table dialogues')" in debug.stderr, debug.stderr
    assert error_lines(debug.stderr) == error_lines(plain.stderr)
