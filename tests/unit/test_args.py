"""CLI and YAML parsing, llama-recipes style, the batch-size rule, and --help."""
import sys
from dataclasses import fields

import pytest

from shardtune.config.parse import parse_args
from shardtune.errors import UserError
from shardtune.config.validate import resolve_batching


def test_seed_command_flags():
    c = parse_args(["--enable_fsdp", "--model_name", "/m", "--use_peft", "--peft_method", "lora",
                    "--output_dir", "/o"])
    assert c.train.enable_fsdp is True and c.train.use_peft is True
    assert c.train.model_name == "/m" and c.train.output_dir == "/o" and c.train.peft_method == "lora"


def test_bool_values_and_equals_form():
    c = parse_args(["--run_validation", "False", "--use_peft=True", "--enable_fsdp", "true"])
    assert c.train.run_validation is False and c.train.use_peft is True and c.train.enable_fsdp is True


def test_qualified_and_bare_unique_names():
    c = parse_args(["--samsum_dataset.data_path", "/d", "--lora_config.lora_dropout", "0", "--lora_alpha", "16"])
    assert c.datasets["samsum_dataset"].data_path == "/d"
    assert c.peft["lora_config"].lora_dropout == 0.0
    assert c.peft["lora_config"].lora_alpha == 16


def test_bare_shared_name_sets_every_config():
    c = parse_args(["--mixed_precision", "False"])
    assert c.train.mixed_precision is False and c.fsdp.mixed_precision is False
    c = parse_args(["--fsdp_config.mixed_precision", "False"])
    assert c.train.mixed_precision is True and c.fsdp.mixed_precision is False


def test_list_and_quantization():
    c = parse_args(["--target_modules", "q_proj,k_proj,v_proj", "--quantization"])
    assert c.peft["lora_config"].target_modules == ["q_proj", "k_proj", "v_proj"]
    assert c.train.quantization == "8bit"
    assert parse_args(["--quantization", "4bit"]).train.quantization == "4bit"


@pytest.mark.parametrize("argv, needle", [
    (["--lrr", "1"], "did you mean --lr"),
    (["--batch_size_trainin", "2"], "did you mean --batch_size_training"),
    (["--lr", "fast"], "--lr expects a value of type float"),
    (["--num_epochs", "1.5"], "--num_epochs expects a value of type int"),
    (["--use_peft", "maybe"], None),  # 'maybe' is not a bool: the bare flag, then a stray argument
    (["--enable_fsdp", "yes", "--model_name"], "--model_name needs a value"),
])
def test_bad_flags_are_one_line_errors(argv, needle):
    with pytest.raises(UserError) as err:
        parse_args(argv)
    msg = str(err.value)
    assert "\n" not in msg
    if needle:
        assert needle in msg


def test_yaml_then_cli_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nnum_epochs: 7\nlora_config:\n  r: 4\n")
    c = parse_args(["--config", str(f), "--lr", "0.25"])
    assert c.train.lr == 0.25 and c.train.num_epochs == 7 and c.peft["lora_config"].r == 4
    f.write_text("lr: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_args(["--config", str(f)])


def test_batching_rule():
    b = resolve_batching(parse_args([]))  # defaults: 4 and 4
    assert (b.micro, b.accum) == (4, 1)
    b = resolve_batching(parse_args(["--batch_size_training", "8"]))  # micro follows when not set
    assert (b.micro, b.accum) == (8, 1)
    b = resolve_batching(parse_args(["--batch_size_training", "8", "--micro_batch_size", "2"]))
    assert (b.micro, b.accum) == (2, 4)
    b = resolve_batching(parse_args(["--batch_size_training", "2", "--gradient_accumulation_steps", "3"]))
    assert (b.micro, b.accum) == (2, 3)
    with pytest.raises(UserError, match="not both"):
        resolve_batching(parse_args(["--micro_batch_size", "1", "--gradient_accumulation_steps", "2"]))
    with pytest.raises(UserError, match="multiple"):
        resolve_batching(parse_args(["--batch_size_training", "6", "--micro_batch_size", "4"]))


def test_help_lists_every_field():
    """--help shows every field of every config with its default and its help text."""
    from shardtune.config.parse import shown_default, usage
    from shardtune.config.schema import ALL_CONFIGS, help_text

    text = usage()
    for cls in ALL_CONFIGS:
        section = text.split(f"\n{cls.__name__}:\n", 1)[1].split("\n\n", 1)[0]
        for f in fields(cls):
            assert f"{f.name} (default: {shown_default(f)})" in section, (cls.__name__, f.name)
            assert " ".join(help_text(cls, f).split()) in " ".join(section.split()), (cls.__name__, f.name)


def test_every_field_has_help():
    """Every config field says what it means: a new field needs its help text."""
    from shardtune.config.schema import ALL_CONFIGS

    for cls in ALL_CONFIGS:
        for f in fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.integration  # two real interpreters
def test_help_flag_of_every_entry_point():
    """--help of the module and the llama-recipes script: exit 0 and the grouped reference."""
    from conftest import SHIM, python, run_cmd

    for proc in (python(SHIM, ["--help"]), run_cmd([sys.executable, "-m", "shardtune.cli", "finetune", "--help"])):
        assert proc.returncode == 0, proc.stderr
        assert "\nlora_config:\n  --lora_config.r (default: 8)" in proc.stdout


@pytest.mark.parametrize("content, needle", [
    ("lr: 0.001 # r\u00e9sum\u00e9\n".encode("latin-1"), "not UTF-8"),
    (b"lr: [unclosed\n", "not valid YAML"),
    (b"- lr\n- 0.1\n", "mapping"),
])
def test_bad_yaml_is_one_line(tmp_path, content, needle):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    with pytest.raises(UserError, match=needle) as err:
        parse_args(["--config", str(f)])
    assert "\n" not in str(err.value) and str(f) in str(err.value)
