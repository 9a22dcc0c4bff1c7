"""Packed attention (shardtune/attention.py) runs SDPA once per packed example: the loss
and every gradient must equal transformers' own SDPA with its block-diagonal mask on the
same packed SAMSum batch, for multi-head and grouped-query attention; a sliding window
shorter than an example must fall back to the mask."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from shardtune.modeling import attention, loss
from shardtune.config.parse import parse_args
from shardtune.data import build_split
from shardtune.data.packing import collate
from shardtune.modeling.load import load_tokenizer

LAYERS = 2


@pytest.fixture(scope="module")
def packed(tiny_llama2_tok, shared_data):
    """(tokenizer size, a batch of 3 packed 512-token rows: several examples each, a pad run)."""
    cfgs = parse_args(["--model_name", str(tiny_llama2_tok), "--samsum_dataset.data_path", str(shared_data / "samsum"),
                       "--samsum_dataset.train_split", "validation", "--context_length", "512"])
    tok = load_tokenizer(str(tiny_llama2_tok))
    split = build_split(cfgs, tok, "train")
    chunks = [split.dataset[i] for i in range(len(split.dataset))]
    # best-fit decreasing puts the longest examples first: take the rows with the most examples
    chunks.sort(key=lambda chunk: int((chunk["position_ids"] == 0).sum()), reverse=True)
    return len(tok), collate(chunks[:3], tok.pad_token_id)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    value = loss.token_loss_sum(model, batch, torch.device("cpu"))
    value.backward()
    return value.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {"num_key_value_heads": 4}),
    ("llama", {"num_key_value_heads": 2}),  # grouped-query
    ("mistral", {"num_key_value_heads": 2, "sliding_window": 16}),  # shorter than any example
])
def test_packed_attention_matches_the_masked_path(model_type, extra, packed, monkeypatch):
    vocab, batch = packed
    lengths = attention.packed_lengths(batch["position_ids"])
    assert sum(len(row) for row in lengths) > len(lengths) + 2  # rows hold several examples
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=LAYERS, num_attention_heads=4, head_dim=16, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.PACKED).train()

    calls, masks = [], []
    sdpa = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    AttentionMaskInterface.register(attention.PACKED, lambda *a, **k: masks.append(1) or sdpa_mask(*a, **k))
    try:
        packed_loss, packed_grads = _loss_and_grads(model, batch)
    finally:
        AttentionMaskInterface.register(attention.PACKED, sdpa_mask)
    windowed = "sliding_window" in extra
    assert len(calls) == LAYERS * (1 if windowed else sum(len(row) for row in lengths))
    assert len(masks) == (1 if windowed else 0)  # no [batch, 1, seq, seq] mask for packed rows

    model.set_attn_implementation("sdpa")
    masked_loss, masked_grads = _loss_and_grads(model, batch)
    assert abs(packed_loss - masked_loss) <= 1e-5 * abs(masked_loss), (packed_loss, masked_loss)
    for name, grad in masked_grads.items():
        assert (packed_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_lengths_split_where_transformers_does():
    """A new example wherever a position is not its predecessor's + 1, as transformers'
    mask builder decides (a custom collator's positions need not restart at 0)."""
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [5, 6, 7, 2, 3, 4, 9, 0, 1, 2]])
    sequence_ids = find_packed_sequence_indices(position_ids)
    for row, lengths in zip(sequence_ids, attention.packed_lengths(position_ids)):
        assert list(lengths) == torch.unique_consecutive(row, return_counts=True)[1].tolist()


def test_lengths_are_the_packed_examples(packed):
    """Each example's positions run 0, 1, ... over exactly its length, and the lengths fill the row."""
    _, batch = packed
    for row, lengths in zip(batch["position_ids"], attention.packed_lengths(batch["position_ids"])):
        assert sum(lengths) == len(row)
        for example in row.split(list(lengths)):
            assert example.tolist() == list(range(len(example)))
