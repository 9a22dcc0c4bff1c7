"""The dpo recipe's flag checks and bad pairs: one line each, before any model is built."""

import pytest

from conftest import error_lines, run_cli
from shardtune.config.parse import parse_args
from shardtune.config.validate import check_supported
from shardtune.data.pairs import fit_pairs
from shardtune.data.records import BadRecords
from shardtune.errors import UserError

PAIRS = ["--dataset", "preference_dataset", "--preference_dataset.data_path", "pairs.jsonl"]


@pytest.mark.parametrize("flags, says", [
    (["--dpo_config.loss_type", "kto"], "--dpo_config.loss_type"),
    (["--dpo_config.beta", "0"], "--dpo_config.beta"),
    (["--dpo_config.label_smoothing", "0.5"], "--dpo_config.label_smoothing"),
    (["--dpo_config.loss_type", "ipo", "--dpo_config.label_smoothing", "0.1"], "applies to sigmoid and simpo"),
    (["--dpo_config.loss_type", "simpo", "--dpo_config.reference", "base"], "reference-free"),
    (["--dpo_config.loss_type", "orpo", "--dpo_config.reference", "precomputed"], "reference-free"),
    (["--dpo_config.orpo_alpha", "-1"], "--dpo_config.orpo_alpha"),
    (["--dpo_config.simpo_gamma", "-1"], "--dpo_config.simpo_gamma"),
    (["--use_peft", "--peft_method", "prefix"], "--dpo_config.reference base with --peft_method prefix"),
    (["--use_peft", "--lora_config.bias", "all"], "--lora_config.bias all with --dpo_config.reference base"),
    (["--dpo_config.reference", "/no/such/model"], "--dpo_config.reference '/no/such/model'"),
])
def test_contradictory_dpo_flags_fail_in_one_line(flags, says):
    with pytest.raises(UserError, match=says.replace(".", r"\.")):
        check_supported(parse_args(PAIRS + flags), pairs=True)


def test_a_reference_free_loss_needs_no_reference_and_a_valid_run_passes():
    check_supported(parse_args(PAIRS + ["--dpo_config.loss_type", "simpo"]), pairs=True)
    check_supported(parse_args(PAIRS + ["--use_peft", "--dpo_config.reference", "precomputed"]), pairs=True)
    # precomputed before the first step: the biases are still the base's
    check_supported(parse_args(PAIRS + ["--use_peft", "--lora_config.bias", "all", "--dpo_config.reference",
                                        "precomputed"]), pairs=True)


def test_dpo_refuses_single_examples_and_finetune_refuses_dpo_flags(capsys):
    code, _, err = run_cli(capsys, ["dpo", "--dataset", "samsum_dataset"])
    assert code != 0 and len(error_lines(err)) == 1 and "preference_dataset" in error_lines(err)[0]
    code, _, err = run_cli(capsys, ["finetune", "--dpo_config.beta", "0.2"])
    assert code != 0 and len(error_lines(err)) == 1 and "shardtune dpo" in error_lines(err)[0]


def test_a_pair_longer_than_the_context_is_named_by_record():
    pairs = [{"prompt_ids": [1] * 5, "chosen_ids": [2] * 3, "rejected_ids": [3] * 6, "origin": "p.jsonl record 7"},
             {"prompt_ids": [1] * 2, "chosen_ids": [2] * 3, "rejected_ids": [3] * 3, "origin": "p.jsonl record 8"}]
    with pytest.raises(UserError, match="p.jsonl record 7: prompt \\+ completion is 11 tokens"):
        fit_pairs(pairs, 10, BadRecords("error"))
    bad = BadRecords("skip")
    assert fit_pairs(pairs, 10, bad) == pairs[1:] and bad.count == 1
    assert fit_pairs(pairs, 11, BadRecords("error")) == pairs  # 11 fits exactly
