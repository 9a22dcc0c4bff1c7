"""mixture_dataset: each epoch draws the components in their weights' proportions (exact to
a chunk), without replacement within a pass over a component; the order depends on (seed,
epoch) only, so a data position saved at 2 ranks resumes at 1 visiting every sample of the
epoch once; bad specs and empty components stop with one line."""
import json
from collections import Counter

import pytest
import torch

from shardtune.config.parse import parse_args
from shardtune.data import build_split, train_loader
from shardtune.data.mixture import EpochPlan, parse_spec
from shardtune.data.sampler import GlobalBatchSampler
from shardtune.errors import UserError


@pytest.mark.parametrize("spec,message", [
    ("samsum_dataset:0.5,alpaca_dataset:0", "alpaca_dataset: weight '0' must be a positive number"),
    ("samsum_dataset:-1", "weight '-1' must be a positive number"),
    ("samsum_dataset:abc", "weight 'abc' must be a positive number"),
    ("samsum_dataset:0.5,wiki_dataset:0.5", "unknown mixture component 'wiki_dataset'"),
    ("mixture_dataset:1", "unknown mixture component 'mixture_dataset'"),
    ("samsum_dataset", "is not NAME:WEIGHT"),
    ("", "needs its components"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message) as err:
        parse_spec(spec)
    assert "\n" not in str(err.value)


def test_each_epoch_has_the_weights_proportions_and_a_pass_never_repeats():
    sizes, weights = [1000, 300, 50], [0.6, 0.3, 0.1]
    plan = EpochPlan(sizes, weights, seed=7)
    starts = [0, 1000, 1300]
    drawn = {i: [] for i in range(3)}
    for epoch in range(4):
        order = plan(epoch)
        assert len(order) == sum(sizes)
        component = torch.bucketize(order, torch.tensor(starts[1:]), right=True)
        counts = Counter(component.tolist())
        for i, w in enumerate(weights):
            assert abs(counts[i] / len(order) - w) <= 0.01
            drawn[i] += (order[component == i] - starts[i]).tolist()
    for i, n in enumerate(sizes):  # each full pass over a component holds each of its chunks once
        for p in range(len(drawn[i]) // n):
            assert sorted(drawn[i][p * n:(p + 1) * n]) == list(range(n))
    assert torch.equal(EpochPlan(sizes, weights, seed=7)(2), plan(2))  # (seed, epoch) decide it


def _visited(sampler: GlobalBatchSampler, ranks: int, steps: int | None = None) -> list[int]:
    """The samples of the epoch in consumption order, gathered over the ranks."""
    per_rank = [list(GlobalBatchSampler.__iter__(_at_rank(sampler, r))) for r in range(ranks)]
    out = []
    for micro_step in range(len(per_rank[0]) if steps is None else steps * sampler.accum):
        for r in range(ranks):
            out += per_rank[r][micro_step]
    return out


def _at_rank(sampler: GlobalBatchSampler, rank: int) -> GlobalBatchSampler:
    s = GlobalBatchSampler(sampler.num_samples, sampler.micro, sampler.world, rank, sampler.accum, sampler.seed,
                           epoch_indices=sampler.epoch_indices)
    s.set_epoch(sampler.epoch, sampler.start)
    return s


def test_a_position_saved_at_two_ranks_resumes_at_one_visiting_each_sample_once():
    plan = EpochPlan([120, 40, 9], [0.5, 0.3, 0.2], seed=3)
    two = GlobalBatchSampler(169, micro_batch=2, world=2, rank=0, accum=2, seed=3, epoch_indices=plan)
    two.set_epoch(1)
    whole_epoch = _visited(two, 2)
    before = _visited(two, 2, steps=5)  # killed after 5 optimizer steps: position 5 * 8 samples
    one = GlobalBatchSampler(169, micro_batch=2, world=1, rank=0, accum=4, seed=3, epoch_indices=plan)
    one.set_epoch(1, start=len(before))
    after = _visited(one, 1)
    assert before + after == whole_epoch  # same global batch: the same samples, each once, in order


def test_a_real_mixture_trains_in_proportion_and_an_empty_component_is_one_line(tmp_path, shared_data, llama2_tok):
    args = ["--dataset", "mixture_dataset", "--mixture_dataset.datasets", "samsum_dataset:0.7,alpaca_dataset:0.3",
            "--samsum_dataset.data_path", str(shared_data / "samsum"), "--samsum_dataset.train_split", "validation",
            "--alpaca_dataset.data_path", str(shared_data / "alpaca" / "alpaca_data_200.json"),
            "--context_length", "128", "--data_cache_dir", str(tmp_path / "cache")]
    split = build_split(parse_args(args), llama2_tok, "train")
    samsum_chunks = len(split.dataset.parts[0])
    loader, sampler = train_loader(split, micro=4, accum=1, world=1, rank=0, seed=42, pad_id=0, num_workers=0)
    seen = [i for batch in sampler for i in batch]
    share = sum(i < samsum_chunks for i in seen) / len(seen)
    assert abs(share - 0.7) <= 0.01 and len(seen) >= len(split.dataset) - 3
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "data").glob("*.safetensors"))
    assert cached == ["alpaca_dataset", "samsum_dataset"]  # each component prepared and cached on its own

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(UserError, match=r"^mixture component chat_dataset: .*no usable examples") as err:
        build_split(parse_args([*args, "--mixture_dataset.datasets", "samsum_dataset:1,chat_dataset:1",
                                "--chat_dataset.data_path", str(empty), "--chat_dataset.template", "llama2",
                                "--chat_dataset.validation_path", str(empty), "--on_bad_record", "skip"]),
                    llama2_tok, "train")
    assert "\n" not in str(err.value)


def test_validation_reports_each_component_and_their_token_weighted_whole(tmp_path, shared_data, tiny_llama2_tok):
    """loop.evaluate over a mixture's eval_loaders: each component's loss is that component
    evaluated alone, and the whole is the loss over the concatenated split (one loader)."""
    from transformers import AutoModelForCausalLM

    from shardtune import loop
    from shardtune.data import eval_loader, eval_loaders
    from shardtune.device import Dist
    from shardtune.modeling.load import load_tokenizer

    tok = load_tokenizer(str(tiny_llama2_tok))  # with the pad token the data stage sets
    args = ["--dataset", "mixture_dataset", "--mixture_dataset.datasets", "samsum_dataset:0.2,alpaca_dataset:0.8",
            "--alpaca_dataset.data_path", str(shared_data / "alpaca" / "alpaca_data_200.json"),
            "--context_length", "256", "--data_cache_dir", str(tmp_path / "cache")]
    split = build_split(parse_args(args), tok, "validation")
    assert sorted(split.parts) == ["alpaca_dataset", "samsum_dataset"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama2_tok, dtype=torch.float32)
    one = Dist(0, 0, 1, 1, torch.device("cpu"), "gloo")
    cfg = loop.LoopConfig(accum=1, world=1, max_train_step=0, max_eval_step=0, grad_clip=None, log_every=1)
    loss, _, by_part = loop.evaluate(model, eval_loaders(split, 3, 1, 0, tok.pad_token_id, 0), one, cfg)
    alone = {name: loop.evaluate(model, eval_loader(part, 3, 1, 0, tok.pad_token_id, 0), one, cfg)
             for name, part in split.parts.items()}
    assert by_part == pytest.approx({name: result[0] for name, result in alone.items()}, rel=1e-6)
    whole, _, none = loop.evaluate(model, eval_loader(split, 3, 1, 0, tok.pad_token_id, 0), one, cfg)
    assert loss == pytest.approx(whole, rel=1e-6) and none == {}
    assert min(by_part.values()) < loss < max(by_part.values())


def test_a_weight_that_rounds_a_component_to_nothing_is_one_line_and_quotas_are_logged(tmp_path, shared_data,
                                                                                       llama2_tok, caplog):
    args = ["--dataset", "mixture_dataset", "--samsum_dataset.data_path", str(shared_data / "samsum"),
            "--samsum_dataset.train_split", "validation",
            "--alpaca_dataset.data_path", str(shared_data / "alpaca" / "alpaca_data_200.json"),
            "--context_length", "128", "--data_cache_dir", str(tmp_path / "cache")]
    with caplog.at_level("INFO", logger="shardtune.data"):
        split = build_split(parse_args([*args, "--mixture_dataset.datasets", "samsum_dataset:0.9,alpaca_dataset:0.1"]),
                            llama2_tok, "train")
    sizes = {name: len(part.dataset) for name, part in split.parts.items()}
    quotas = dict(zip(split.parts, split.epoch_indices.quotas))
    for name in sizes:  # each component's quota and repeat factor, from the plan itself
        assert any(name in r.getMessage() and f" {quotas[name]} of {sum(sizes.values())} " in r.getMessage()
                   and f"{quotas[name] / sizes[name]:.2f}x" in r.getMessage() for r in caplog.records), name
    with pytest.raises(UserError, match=r"^mixture component alpaca_dataset: weight 0.0001 .* 0 of") as err:
        build_split(parse_args([*args, "--mixture_dataset.datasets", "samsum_dataset:0.9,alpaca_dataset:0.0001"]),
                    llama2_tok, "train")
    assert "\n" not in str(err.value)
