"""shardtune plan: the model constants against transformers and published counts, the
CLI's fit check and suggestion, and NF4 shards refused before launch. The prediction against
peak memory measured in real fine-tunes is a benchmark (benchmarks/plan_vs_measured.py,
BENCHMARKS.md "Memory planner: predicted vs measured"): memory is measured there, not in the suite."""
import json

import pytest
import torch

from shardtune.config.parse import parse_args
from shardtune.commands.plan import (
    KNOWN_MODELS,
    Launch,
    main,
    parse_size,
    plan_memory,
)


# Parameter counts as Hugging Face reports them (peft's print_trainable_parameters "all
# params" on the meta-llama checkpoints, minus the adapter).
PUBLISHED = {"7B": 6_738_415_616, "13B": 13_015_864_320, "70B": 68_976_648_192, "Llama-3-8B": 8_030_261_248,
             "Llama-3-70B": 70_553_706_496}


@pytest.mark.parametrize("name", list(KNOWN_MODELS))
def test_known_models_match_transformers_and_published_counts(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = KNOWN_MODELS[name]
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied)
    with torch.device("meta"):
        reference = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert shape.params() == reference == PUBLISHED[name]


def test_7b_full_fp32_and_lora_terms():
    p = PUBLISHED["7B"]
    full = plan_memory(parse_args(["--model_name", "7B", "--mixed_precision", "False"]), KNOWN_MODELS["7B"],
                       Launch(overhead=0))
    assert full.parameters == 4 * p  # fp32 weights, one process: nothing gathered, no autocast copies
    assert full.optimizer == 8 * p  # AdamW: two fp32 states
    assert full.gradients == 4 * p
    # LoRA r=8 on q_proj,v_proj of Llama-2-7B: 4,194,304 trainable parameters (peft's printout)
    lora = plan_memory(parse_args(["--model_name", "7B", "--use_peft", "--mixed_precision", "False"]),
                       KNOWN_MODELS["7B"], Launch(overhead=0))
    assert lora.optimizer == 8 * 4_194_304
    assert lora.parameters == 4 * (p + 4_194_304)
    # bf16 mixed precision: the frozen base in bf16, the adapter's master weights in fp32
    mixed = plan_memory(parse_args(["--model_name", "7B", "--use_peft", "--mixed_precision", "True"]),
                        KNOWN_MODELS["7B"], Launch(overhead=0))
    assert mixed.parameters == 2 * p + 4 * 4_194_304
    # under FSDP an adapter's gradients stay unsharded across accumulating micro-batches; a
    # full fine-tune's are reduce-scattered after each one, so accumulation adds nothing
    def grads(*flags):
        return plan_memory(parse_args(["--model_name", "7B", "--enable_fsdp", "--mixed_precision", "False",
                                       "--batch_size_training", "8", *flags]),
                           KNOWN_MODELS["7B"], Launch(world_size=8, overhead=0)).gradients
    assert grads("--use_peft", "--micro_batch_size", "2") == 8 * grads("--use_peft", "--micro_batch_size", "8")
    assert grads("--micro_batch_size", "2") == grads("--micro_batch_size", "8")
    # FULL_SHARD over 8 ranks: an eighth of the states per rank
    sharded = plan_memory(parse_args(["--model_name", "7B", "--enable_fsdp", "--mixed_precision", "False"]),
                          KNOWN_MODELS["7B"], Launch(world_size=8, overhead=0))
    assert sharded.optimizer == 8 * p // 8


def test_sizes():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("24G") == 24 * 2**30
    assert parse_size("512MiB") == 512 * 2**20


def test_cli_does_not_fit_and_the_suggestion_does(capsys):
    argv = ["--model_name", "70B", "--enable_fsdp", "--world_size", "8", "--device_memory", "80GiB", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["plan"]["peak"] > 80 * 2**30
    change = out["suggestion"]
    # planning again with the suggested change gives the suggested plan, which fits
    launch = Launch(**change["launch"])
    finetune = ["--model_name", "70B", "--enable_fsdp", *change["flags"]]
    again = plan_memory(parse_args(finetune), KNOWN_MODELS["70B"], launch)
    assert again.peak == change["plan"]["peak"] <= 80 * 2**30


def test_cli_unknown_model_is_one_line(capsys):
    assert main(["--model_name", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/model" in err[0]


def test_nf4_shards_that_miss_whole_blocks_are_refused_before_launch(capsys, tmp_path):
    """Qwen2.5-0.5B (hidden 896: a 2-rank q_proj shard is 448 x 896 = 24.5 NF4 blocks of 64 x
    256) cannot run QLoRA under FSDP2 at 2 ranks: plan says so in the run's own line; Llama 3
    at 8 ranks fits, and without FSDP there is nothing to split."""
    qwen = tmp_path / "qwen2.5-0.5b"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}))
    qlora = ["--use_peft", "--peft_method", "lora", "--quantization", "4bit"]
    assert main(["--model_name", str(qwen), "--enable_fsdp", "--world_size", "2", *qlora]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q_proj" in err[0] and "(896, 896)" in err[0] and "over 1 ranks" in err[0], err
    assert main(["--model_name", str(qwen), "--world_size", "1", *qlora]) == 0
    assert main(["--model_name", "Llama-3-8B", "--enable_fsdp", "--world_size", "8", *qlora]) == 0
