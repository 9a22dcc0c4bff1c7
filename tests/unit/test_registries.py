"""Each PEFT method and each dataset is declared once (config.schema.PEFT_METHODS,
DATASETS); these tests fail when an entry lacks what the rest of shardtune needs from it:
its code, its planner count (checked against peft's own count), its generation scorer,
its README rows. Help text for every config field is tests/integration/test_args.py's."""
import importlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO
from shardtune import adapters
from shardtune.commands.evaluate import SCORERS
from shardtune.commands.plan import ModelShape
from shardtune.config.parse import parse_args
from shardtune.config.schema import DATASETS, PEFT_METHODS

README = (REPO / "README.md").read_text()


def _row(name: str) -> str:
    """The README's train_config row of a field."""
    return next(line for line in README.splitlines() if line.startswith(f"| {name} |"))


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_method_has_code_planner_count_and_readme_row(method):
    module = adapters.code(method)
    missing = [name for name in adapters.REQUIRED if not callable(getattr(module, name, None))]
    assert not missing, f"shardtune.adapters.{method} lacks {missing}"
    assert method in _row("peft_method"), f"README's peft_method row does not name {method}"

    # the planner's count is what peft trains on a real (meta-device) model of that shape
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    flags = ["--use_peft", "--peft_method", method]
    if method == "lora":  # every linear, with DoRA's magnitudes: the count's every term
        flags += ["--lora_config.target_modules", "all-linear", "--lora_config.use_dora", "True"]
    cfgs = parse_args(flags)
    peft_model = adapters.wrap(model, cfgs)
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shape = ModelShape(256, 64, 176, 3, 4, 2, 16)
    assert module.trainable_params(cfgs.peft_config, shape) == trained > 0


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_has_reader_scorer_and_readme_row(name):
    kind = DATASETS[name]
    reader = importlib.import_module(f"shardtune.data.{kind.module}")
    assert callable(getattr(reader, "source", None)), f"shardtune.data.{kind.module} has no source()"
    assert kind.generation_metric is None or kind.generation_metric in SCORERS
    assert name in _row("dataset"), f"README's dataset row does not name {name}"
