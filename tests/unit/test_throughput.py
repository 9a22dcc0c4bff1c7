"""Model FLOPs of a batch (metrics/throughput.py) count what the step computes: every weight
but the head at each token, the head at labelled positions only, causal attention within each
example. Checked against a count by hand from the config, and against torch's FlopCounterMode
on one forward and backward of a tiny model on CPU."""
import pytest
import torch
from peft import AdaptionPromptConfig, LoraConfig, PrefixTuningConfig, get_peft_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from shardtune.data.packing import collate
from shardtune.metrics import throughput
from shardtune.modeling import attention, loss

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 128, 64, 176, 2, 4, 2, 16
LABELLED = [3, 4, 5, 20, 21, 22, 23, 31, 32]  # positions of each row that carry a label


def tiny(peft_config=None, tied=False):
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.PACKED)
    return (get_peft_model(model, peft_config) if peft_config else model), config


def chunk(lengths: list[int], labelled: list[int]) -> dict:
    """A packed chunk of examples of these lengths, labels at `labelled`."""
    ids = torch.randint(3, VOCAB, (sum(lengths),))
    labels = torch.full_like(ids, -100)
    labels[labelled] = ids[labelled]
    return {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(n) for n in lengths])}


def test_a_batch_counts_by_hand():
    """LoRA r=4 on q_proj and v_proj: a packed row (5 + 7 tokens) and a padded one (9 of 12)."""
    model, config = tiny(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batch = collate([chunk([5, 7], [2, 3, 9, 10, 11]), chunk([9], [6, 7, 8])], pad_id=0)
    assert (batch["num_tokens"], batch["num_targets"]) == (21, 8)
    assert batch["num_attention_pairs"] == 15 + 28 + 45  # n(n+1)/2 per example; the pad run is none

    kv = KV_HEADS * HEAD_DIM
    frozen = LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * INTER)  # q, o, k, v, MLP
    lora = LAYERS * 4 * (2 * HIDDEN + HIDDEN + kv)  # A: hidden -> 4, B: 4 -> out, on q and v
    expected = (21 * (4 * frozen + 6 * lora)  # every token through the decoder
                + 8 * 4 * VOCAB * HIDDEN  # the frozen head at the 8 labelled positions
                + 88 * 12 * LAYERS * HEADS * HEAD_DIM)  # QK^T and AV per causal pair, 3x for backward
    flops = throughput.model_flops(model, config)
    assert flops.of_batch(batch["num_tokens"], batch["num_targets"], batch["num_attention_pairs"]) == expected


def test_a_packed_row_of_short_examples_counts_less_attention_than_the_full_row():
    model, config = tiny()
    flops = throughput.model_flops(model, config)
    row = collate([chunk([128] * 4, [])], pad_id=0)  # four examples in a 512-token row
    palm = 12 * LAYERS * HEADS * HEAD_DIM * 512 * 512  # full square over the whole row
    attention_flops = row["num_attention_pairs"] * flops.per_pair
    assert attention_flops == palm * (4 * 128 * 129 / 2) / 512**2
    assert attention_flops < palm / 7


def test_the_head_counts_per_target_and_trains_with_a_tied_embedding():
    model, config = tiny(tied=True)
    flops = throughput.model_flops(model, config)
    assert flops.head_trainable == VOCAB * HIDDEN and flops.head_frozen == 0  # counted as the head, once
    assert flops.of_batch(0, 3, 0) == 3 * 6 * VOCAB * HIDDEN


@pytest.mark.parametrize("method, tied, rows, masked", [
    ("lora", True, [[10, 30], [40]], False),  # packed rows, the frozen head tied to the embedding
    ("full", False, [[10, 30], [40]], False),  # everything trains, the head too
    ("prefix", False, [[40], [40]], True),  # one example per row with a mask, prefix keys
    ("llama_adapter", False, [[10, 30], [40]], False),  # prompt keys in each layer
])
def test_matches_torch_flop_counter(method, tied, rows, masked, monkeypatch):
    """The formula against the matmuls torch counts in one forward and backward. Rows are
    full (no pad run), so every attention call is one example's or the mask's of one row."""
    peft_config = {"lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                   "full": None,
                   "prefix": PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"),
                   "llama_adapter": AdaptionPromptConfig(adapter_len=5, adapter_layers=LAYERS, task_type="CAUSAL_LM"),
                   }[method]
    model, config = tiny(peft_config, tied)
    if peft_config:
        # the formula counts every frozen weight's activation gradient; autograd would skip
        # the first layer's projections of the (frozen) embedding output
        model.enable_input_require_grads()
    # model FLOPs leave recomputation out: run the head + CE chunks without their checkpoint
    monkeypatch.setattr(loss, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    batch = collate([chunk(row, LABELLED) for row in rows], pad_id=0)
    # SDPA's math backend is made of bmm's, which FlopCounterMode counts (the CPU flash kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss.token_loss_sum(model, batch, torch.device("cpu"), mask_from_positions=masked).backward()
    counted = counter.get_flop_counts()["Global"]

    flops = throughput.model_flops(model, config)
    weights = (batch["num_tokens"] * (6 * flops.trainable + 4 * flops.frozen)
               + batch["num_targets"] * flops.per_target)
    attention_flops = (batch["num_attention_pairs"] * flops.per_pair
                       + batch["num_tokens"] * 12 * flops.attention_width * flops.prompt_keys)
    assert weights + attention_flops == flops.of_batch(batch["num_tokens"], batch["num_targets"],
                                                        batch["num_attention_pairs"])
    # the math backend computes each example's full square and masks its future half
    future_pairs = sum(n * (n - 1) // 2 for row in rows for n in row)
    assert attention_flops == pytest.approx(counted[torch.ops.aten.bmm] - future_pairs * flops.per_pair, rel=0.01)
    if method == "llama_adapter":
        # Work above the model's: peft recomputes each token's q_proj (forward and input
        # gradient) and an unused v_proj (forward), applies o_proj to the adapter's output
        # apart from the attention's, and projects the prompt to keys and values each forward.
        kv = KV_HEADS * HEAD_DIM
        per_token = 4 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 4 * HIDDEN * HIDDEN
        weights += LAYERS * (batch["num_tokens"] * per_token + 5 * 4 * 2 * HIDDEN * kv)
    assert weights == pytest.approx(counted[torch.ops.aten.mm], rel=0.01)


def test_a_reference_run_forward_only_adds_a_third_of_its_training_count():
    """DPO's live reference runs every batch forward without backward: 2 FLOPs per weight use
    and 4 * width per attention pair, a third of a full fine-tune's count of the same model."""
    model, config = tiny()
    full = throughput.model_flops(model, config)  # every weight trains: 6N, 12 per pair
    lora, _ = tiny(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    policy = throughput.model_flops(lora, config)
    with_reference = throughput.ModelFlops(**{**vars(policy), "reference": full})
    counts = (21, 8, 88)
    assert with_reference.of_batch(*counts) == policy.of_batch(*counts) + full.of_batch(*counts) / 3
