"""SAMSum template and label masks, packing isolation, padding vs packing, drop_last, and
the global-batch samplers (plain and length-grouped), on the real corpus in ../shared/data."""
import json
import logging
import random

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from shardtune.config.parse import parse_args
from shardtune.data import build_split, samsum, train_loader
from shardtune.data.packing import collate, pack
from shardtune.data.sampler import EvalSampler, GlobalBatchSampler
from shardtune.data.tokenize import IGNORE_INDEX, tokenize_prompt_target
from shardtune.modeling.loss import token_loss_sum


def test_samsum_labels_token_by_token(shared_data, llama2_tok):
    cfg = parse_args(["--samsum_dataset.data_path", str(shared_data / "samsum")]).dataset
    examples, source = samsum.get_split(cfg, llama2_tok, "validation")
    records = json.loads((shared_data / "samsum" / "val.json").read_text())
    assert len(examples) == len(records) == 818 and source.endswith("val.json")
    for ex, rec in zip(examples[:50], records[:50]):
        prompt = "Summarize this dialog:\n" + rec["dialogue"] + "\n---\nSummary:\n"
        # independent expectation: Llama 2 ids, BOS=1 first, EOS=2 last
        p_ids = [1] + llama2_tok.encode(prompt, add_special_tokens=False)
        t_ids = llama2_tok.encode(rec["summary"], add_special_tokens=False) + [2]
        assert ex["input_ids"] == p_ids + t_ids
        for i, (tok, lab) in enumerate(zip(ex["input_ids"], ex["labels"])):
            if i < len(p_ids):
                assert lab == IGNORE_INDEX, f"prompt token {i} is trained"
            else:
                assert lab == tok, f"target token {i} is masked"


def test_empty_dialogue_record_is_valid(shared_data, llama2_tok):
    records = json.loads((shared_data / "samsum" / "train.json").read_text())
    empty = [r for r in records if r["dialogue"] == ""]
    assert [r["id"] for r in empty] == ["13828807"]
    ex = tokenize_prompt_target(llama2_tok, [samsum.PROMPT.format(dialog="")], [empty[0]["summary"]])[0]
    assert any(l != IGNORE_INDEX for l in ex["labels"])


def test_full_samsum_split_counts(shared_data, tiny_model, caplog, tmp_path):
    from shardtune.modeling.load import load_tokenizer

    cfgs = parse_args(["--samsum_dataset.data_path", str(shared_data / "samsum"), "--context_length", "4096",
                       "--data_cache_dir", str(tmp_path)])
    tok = load_tokenizer(str(tiny_model))
    with caplog.at_level(logging.INFO, logger="shardtune.data"):
        train = build_split(cfgs, tok, "train")
        val = build_split(cfgs, tok, "validation")
    assert train.stats.examples == 14732 and val.stats.examples == 818
    assert train.stats.bad_records == 0 and val.stats.bad_records == 0  # the empty dialogue is valid input
    # every SAMSum example has a summary, so only truncation can leave nothing to learn
    assert train.stats.skipped_no_target <= train.stats.truncated
    assert sum(len(c["input_ids"]) for c in train.dataset.chunks) == train.stats.tokens
    report = caplog.text
    assert "train split from" in report and "14732 examples" in report and "818 examples" in report
    assert "0 bad records skipped" in report and "truncated to 4096" in report


def _per_example_loss(model, examples):
    total, n = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        labels[0, 0] = IGNORE_INDEX
        logits = model(input_ids=ids).logits
        total += F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
        n += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return total / n


def _packed_loss(model, chunks, pad_id, restart_positions=True):
    """The training loop's own forward on a collated packed batch."""
    batch = collate(chunks, pad_id)
    if not restart_positions:
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    return token_loss_sum(model, batch, torch.device("cpu")).item() / batch["num_targets"]


@torch.no_grad()
def test_packing_isolates_examples(tiny_model):
    from shardtune.modeling.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    cfgs = parse_args([])
    examples, _ = samsum.get_split(cfgs.dataset, tok, "train")
    examples = examples[:9]
    chunks, stats = pack(examples, context_length=700)
    assert stats.chunks < len(examples)  # several examples share a chunk
    reference = _per_example_loss(model, examples)
    packed = _packed_loss(model, chunks, tok.pad_token_id)
    assert abs(packed - reference) <= 1e-5
    # Without isolation (positions running on, so one causal block), the loss differs:
    leaky = _packed_loss(model, chunks, tok.pad_token_id, restart_positions=False)
    assert abs(leaky - reference) > 1e-4  # a random tiny model barely uses context, yet 10x the tolerance


def test_packing_keeps_tail_and_truncates():
    examples = [{"input_ids": list(range(10)), "labels": list(range(10))} for _ in range(5)]
    examples.append({"input_ids": list(range(50)), "labels": list(range(50))})
    chunks, stats = pack(examples, context_length=25)
    assert stats.truncated == 1 and stats.chunks == 4
    # best-fit-decreasing: the truncated example fills a chunk, the 10-token ones pair up, the
    # emptiest chunk (one example) comes last and is kept
    assert [len(c["input_ids"]) for c in chunks] == [25, 20, 20, 10]
    assert chunks[1]["position_ids"].tolist() == list(range(10)) * 2
    assert chunks[1]["labels"][10].item() == IGNORE_INDEX  # boundary not trained


def test_global_batch_does_not_depend_on_world_or_accum():
    def step_sets(micro, world, accum):
        samplers = [GlobalBatchSampler(50, micro, world, r, accum, seed=3) for r in range(world)]
        per_rank = [list(s) for s in samplers]
        steps = []
        for k in range(samplers[0].steps_per_epoch):
            got = set()
            for r in range(world):
                for m in range(accum):
                    got.update(per_rank[r][k * accum + m])
            steps.append(got)
        return steps

    ref = step_sets(4, 1, 1)
    assert len(ref) == 12 and all(len(s) == 4 for s in ref)
    assert step_sets(2, 2, 1) == ref == step_sets(1, 1, 4) == step_sets(1, 2, 2)
    s = GlobalBatchSampler(50, 4, 1, 0, 1, seed=3)
    s.set_epoch(1)
    assert list(s)[0] != list(GlobalBatchSampler(50, 4, 1, 0, 1, seed=3))[0]  # reshuffled per epoch
    s.set_epoch(1, start=8)  # resume skips consumed global samples
    assert len(s) == 10


def test_eval_sampler_covers_everything_once():
    seen = []
    for r in range(3):
        batches = list(EvalSampler(10, 2, 3, r))
        assert len(batches) == 2  # same count on every rank
        seen += [i for b in batches for i in b if i >= 0]
    assert sorted(seen) == list(range(10))


def _segment_losses(model, batch):
    """Per-example (loss sum, targets) of a collated batch, keyed by the example's token ids:
    examples are found at the position_id restarts; pad runs carry no targets."""
    # use_cache=False as in training: transformers only reads packed position_ids without a cache
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                                 reduction="none")
    out = {}
    for row in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            labels = batch["labels"][row, a:b]
            n = int((labels[1:] != IGNORE_INDEX).sum())
            if n:  # token i predicts labels[i + 1]; the loss of segment [a, b) sits at a .. b-2
                out[tuple(batch["input_ids"][row, a:b].tolist())] = (token_loss[row, a:b - 1].sum().item(), n)
    return out


@torch.no_grad()
def test_padding_gives_the_same_per_example_losses_as_packing(tiny_model, tmp_path):
    from shardtune.modeling.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    losses = {}
    for strategy in ("packing", "padding"):
        cfgs = parse_args(["--batching_strategy", strategy, "--context_length", "600", "--data_cache_dir", str(tmp_path)])
        split = build_split(cfgs, tok, "validation")  # the bundled sample: 16 dialogues
        loader, _ = train_loader(split, 4, 1, 1, 0, 0, tok.pad_token_id, 0)
        losses[strategy] = {}
        for batch in loader:
            losses[strategy].update(_segment_losses(model, batch))
    packed, padded = losses["packing"], losses["padding"]
    assert len(padded) == 16 and packed.keys() == padded.keys()
    assert max(abs(packed[k][0] / packed[k][1] - padded[k][0] / padded[k][1]) for k in packed) <= 1e-5
    # and both equal each example run on its own
    for ids, (loss_sum, n) in list(padded.items())[:6]:
        labels = [IGNORE_INDEX] * (len(ids) - n) + list(ids)[len(ids) - n:]  # SAMSum targets end the example
        assert abs(_per_example_loss(model, [{"input_ids": list(ids), "labels": labels}]) - loss_sum / n) <= 1e-5


def test_drop_last_drops_only_the_partly_filled_last_chunk(tmp_path):
    examples = [{"input_ids": list(range(10)), "labels": list(range(10))} for _ in range(5)]
    chunks, stats = pack(examples, context_length=25, drop_last=True)
    assert [len(c["input_ids"]) for c in chunks] == [20, 20] and stats.dropped_last == 1
    assert stats.tokens == 40 and stats.target_tokens == 2 * 2 * 9
    chunks, stats = pack(examples[:4], context_length=20, drop_last=True)  # the last chunk is full: kept
    assert [len(c["input_ids"]) for c in chunks] == [20, 20] and stats.dropped_last == 0
    chunks, stats = pack(examples, context_length=25, packing=False, drop_last=True)  # no partial chunk
    assert len(chunks) == 5 and stats.dropped_last == 0


def _length_grouped_steps(lengths, micro, world, accum, epoch=0):
    """Per optimizer step: the set of samples, and the sets of each global micro-step."""
    samplers = [GlobalBatchSampler(len(lengths), micro, world, r, accum, seed=7, lengths=lengths) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    steps, micro_steps = [], []
    for k in range(samplers[0].steps_per_epoch):
        step = set()
        for m in range(accum):
            ms = set()
            for r in range(world):
                ms.update(per_rank[r][k * accum + m])
            micro_steps.append(ms)
            step |= ms
        steps.append(step)
    return steps, micro_steps


def test_length_grouped_sampler_keeps_the_global_batch_contract():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    ref, ref_micro = _length_grouped_steps(lengths, 4, 1, 2)
    assert len(ref) == 125 and all(len(s) == 8 for s in ref)
    assert len(set().union(*ref)) == 1000  # each sample once per epoch
    # the same global batch whatever the split over ranks and accumulation ...
    for micro, world, accum in ((2, 2, 2), (1, 2, 4), (8, 1, 1), (1, 8, 1), (2, 4, 1)):
        assert _length_grouped_steps(lengths, micro, world, accum)[0] == ref, (micro, world, accum)
    # ... and the same global micro-steps when micro x world is the same
    assert _length_grouped_steps(lengths, 2, 2, 2)[1] == _length_grouped_steps(lengths, 1, 4, 2)[1] == ref_micro

    def padding_waste(micro_steps):
        return sum(max(lengths[i] for i in ms) * len(ms) - sum(lengths[i] for i in ms) for ms in micro_steps)

    plain = GlobalBatchSampler(1000, 4, 1, 0, 2, seed=7)
    plain_micro = [set(b) for b in plain]
    assert padding_waste(ref_micro) < 0.1 * padding_waste(plain_micro)  # grouped by length
    assert _length_grouped_steps(lengths, 4, 1, 2, epoch=1)[0] != ref  # reshuffled per epoch
    # the only state is (epoch, start): resuming at a step gives the rest of the same epoch
    s = GlobalBatchSampler(1000, 4, 1, 0, 2, seed=7, lengths=lengths)
    full = list(s)
    s.set_epoch(0, start=8 * 40)
    assert list(s) == full[80:] and len(s) == len(full) - 80
