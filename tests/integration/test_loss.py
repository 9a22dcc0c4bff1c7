"""The loss computes the output head and cross-entropy only at labelled positions, in
checkpointed chunks: its value and every gradient must equal the plain path (full
logits, then CE) on the same batch, in one process and under 2-rank FSDP2, with tied
embeddings too, and for a model that soft-caps its logits. The one-process tests run in
fp32 on the device SHARDTUNE_TEST_DEVICE names (default cpu)."""
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, check, torchrun
from shardtune.modeling import loss
from shardtune.config.parse import parse_args
from shardtune.data import build_split
from shardtune.data.packing import collate
from shardtune.modeling.load import load_tokenizer
from shardtune.modeling.tiny import build_tiny

WORKER = REPO / "tests" / "workers" / "loss_probe.py"
CHUNK = 32  # several chunks per batch, the last one partial
DEVICE = torch.device(os.environ.get("SHARDTUNE_TEST_DEVICE", "cpu"))


def _args(model_dir, shared_data, *extra):
    return ["--model_name", str(model_dir), "--samsum_dataset.data_path", str(shared_data / "samsum"),
            "--samsum_dataset.train_split", "validation", "--context_length", "256", *extra]


def _batch(model_dir, shared_data, chunks=range(3)):
    cfgs = parse_args(_args(model_dir, shared_data))
    tok = load_tokenizer(str(model_dir))
    split = build_split(cfgs, tok, "train")
    return collate([split.dataset[i] for i in chunks], tok.pad_token_id)


def _plain_loss(model, batch):
    ids, pos, labels = (batch[k].to(DEVICE) for k in ("input_ids", "position_ids", "labels"))
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def _both(model, batch):
    """(loss, grads) of shardtune's loss and of the plain path."""
    results = []
    for compute in (lambda: loss.token_loss_sum(model, batch, DEVICE), lambda: _plain_loss(model, batch)):
        model.zero_grad(set_to_none=True)
        value = compute()
        value.backward()
        results.append((value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


def _assert_same(ours, plain, rel=1e-6):
    (loss_ours, grads_ours), (loss_plain, grads_plain) = ours, plain
    assert abs(loss_ours - loss_plain) <= rel * abs(loss_plain), (loss_ours, loss_plain)
    assert grads_ours.keys() == grads_plain.keys() and grads_plain
    for name, g in grads_plain.items():
        assert (grads_ours[name] - g).norm() <= rel * g.norm(), name


@pytest.fixture(scope="module")
def llama2_models(tmp_path_factory, shared_data):
    """Tiny Llamas with the real Llama 2 tokenizer (32,000-way head), untied and tied."""
    root = tmp_path_factory.mktemp("loss-models")
    tok = str(shared_data / "tokenizers" / "llama2")
    return {tied: build_tiny(str(root / f"tied-{tied}"), tokenizer=tok, tie_word_embeddings=tied) for tied in (False, True)}


@pytest.mark.parametrize("tied", [False, True])
def test_same_loss_and_gradients_as_full_logits(tied, llama2_models, shared_data, monkeypatch):
    monkeypatch.setattr(loss, "CE_CHUNK_TOKENS", CHUNK)
    model_dir = llama2_models[tied]
    batch = _batch(model_dir, shared_data)
    assert batch["num_targets"] > 2 * CHUNK
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).train()
    _assert_same(*_both(model, batch))


def test_softcapped_logits_take_the_unfused_path(tiny_model, shared_data):
    """Gemma 2 soft-caps its logits after the head: the loss must still match."""
    tok = load_tokenizer(str(tiny_model))
    config = AutoConfig.for_model("gemma2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  final_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(DEVICE).train()
    _assert_same(*_both(model, _batch(tiny_model, shared_data)))


def test_a_batch_without_targets_still_backwards(tiny_model, shared_data):
    batch = _batch(tiny_model, shared_data, chunks=[0])
    batch["labels"][:] = -100
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(DEVICE).train()
    value = loss.token_loss_sum(model, batch, DEVICE)
    value.backward()
    assert value.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_eval_under_no_grad_gives_the_same_loss(tiny_model, shared_data):
    batch = _batch(tiny_model, shared_data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(DEVICE).eval()
    with torch.no_grad():
        ours, plain = loss.token_loss_sum(model, batch, DEVICE).item(), _plain_loss(model, batch).item()
    assert abs(ours - plain) <= 1e-6 * plain


def test_two_ranks_same_loss_and_gradients(llama2_models, shared_data, tmp_path):
    """Full fine-tuning under FSDP2 (FULL_SHARD, activation checkpointing), so the root
    unit's head and embedding gradients are reduce-scattered too, untied and tied; and DDP."""
    runs = []
    for tied, wrap in ((False, "--enable_fsdp"), (True, "--enable_fsdp"), (False, None)):
        out = tmp_path / f"{tied}-{wrap}.safetensors"
        args = _args(llama2_models[tied], shared_data, "--data_cache_dir", str(tmp_path / "cache"), *filter(None, [wrap]))
        check(torchrun(2, WORKER, [str(out), str(CHUNK), *args]))
        runs.append(load_file(out))
    for saved in runs:
        grads = {prefix: {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(prefix + "/")}
                 for prefix in ("ours", "plain")}
        assert len(grads["plain"]) > 10  # every parameter of the model has a gradient
        _assert_same((saved["loss/ours"].item(), grads["ours"]), (saved["loss/plain"].item(), grads["plain"]))
