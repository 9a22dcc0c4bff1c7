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
    (["--dpo_config.loss_type", "ipo", "--dpo_config.label_smoothing", "0.1"], "--dpo_config.label_smoothing"),
    # TRL 1.16's sigmoid has no label smoothing: conservative DPO is cdpo
    (["--dpo_config.label_smoothing", "0.1"], "--dpo_config.loss_type cdpo"),
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
    check_supported(parse_args(PAIRS + ["--dpo_config.loss_type", "cdpo", "--dpo_config.label_smoothing", "0.1"]),
                    pairs=True)
    check_supported(parse_args(PAIRS + ["--use_peft", "--dpo_config.reference", "precomputed"]), pairs=True)
    # precomputed before the first step: the biases are still the base's
    check_supported(parse_args(PAIRS + ["--use_peft", "--lora_config.bias", "all", "--dpo_config.reference",
                                        "precomputed"]), pairs=True)


def test_dpo_refuses_single_examples_and_finetune_refuses_dpo_flags(capsys):
    code, _, err = run_cli(capsys, ["dpo", "--dataset", "samsum_dataset"])
    assert code != 0 and len(error_lines(err)) == 1 and "preference_dataset" in error_lines(err)[0]
    code, _, err = run_cli(capsys, ["finetune", "--dpo_config.beta", "0.2"])
    assert code != 0 and len(error_lines(err)) == 1 and "shardtune dpo" in error_lines(err)[0]


PAIRS_7_8 = [{"prompt_ids": [1] * 5, "chosen_ids": [2] * 3, "rejected_ids": [3] * 6, "origin": "p.jsonl record 7"},
             {"prompt_ids": [1] * 2, "chosen_ids": [2] * 3, "rejected_ids": [3] * 3, "origin": "p.jsonl record 8"}]


def test_refused_a_pair_longer_than_the_context_is_named_by_record():
    with pytest.raises(UserError, match="p.jsonl record 7: prompt \\+ completion is 11 tokens"):
        fit_pairs(PAIRS_7_8, 10, BadRecords("error"), "refuse")
    bad = BadRecords("skip")
    assert fit_pairs(PAIRS_7_8, 10, bad, "refuse") == (PAIRS_7_8[1:], 0, 0) and bad.count == 1
    assert fit_pairs(PAIRS_7_8, 11, BadRecords("error"), "refuse") == (PAIRS_7_8, 0, 0)  # 11 fits exactly


def test_keep_start_cuts_completions_as_trl_and_counts_them_apart_from_bad_records():
    """TRL 1.16 (DataCollatorForPreference, keep_start): prompt + completion cut to max_length,
    and a pair whose prompt alone fills it dropped; here each completion keeps its first
    context - prompt tokens."""
    bad = BadRecords("error")  # a long pair is no bad record: it does not stop the run
    prompt_fills = {"prompt_ids": [1] * 10, "chosen_ids": [2], "rejected_ids": [3], "origin": "p.jsonl record 9"}
    kept, truncated, dropped = fit_pairs(PAIRS_7_8 + [prompt_fills], 10, bad)
    assert (truncated, dropped, bad.count) == (1, 1, 0)
    assert kept[0]["chosen_ids"] == [2] * 3 and kept[0]["rejected_ids"] == [3] * 5  # 10 - 5 prompt tokens
    assert kept[0]["prompt_ids"] == [1] * 5 and kept[1] == PAIRS_7_8[1]
    with pytest.raises(UserError, match="truncation_mode"):
        check_supported(parse_args(PAIRS + ["--dpo_config.truncation_mode", "keep_end"]), pairs=True)


def test_cdpo_is_conservative_dpo_and_sigmoid_is_plain_dpo():
    """cDPO (Mitchell 2023): -(1-e) log s(b*d) - e log s(-b*d), d the chosen minus rejected
    log-ratio; TRL 1.16's sigmoid is -log s(b*d). Computed here from plain floats."""
    import math

    import torch

    from shardtune.modeling.preference import PairLoss

    c, r, ref_c, ref_r, b, e = -10.0, -14.0, -11.0, -12.5, 0.1, 0.2
    d = (c - ref_c) - (r - ref_r)  # 3.5
    log_s = lambda x: -math.log1p(math.exp(-x))
    args = [torch.tensor([v], dtype=torch.float64) for v in (c, r, ref_c, ref_r, 5.0, 7.0)]
    cdpo = PairLoss("cdpo", beta=b, label_smoothing=e).terms(*args)[0].item()
    sigmoid = PairLoss("sigmoid", beta=b).terms(*args)[0].item()
    assert math.isclose(cdpo, -(1 - e) * log_s(b * d) - e * log_s(-b * d), rel_tol=1e-12)
    assert math.isclose(sigmoid, -log_s(b * d), rel_tol=1e-12)
