"""shardtune dpo against independent references on identical inputs, one process:
MODEL PAIRS OUT CASE... where CASE is METHOD:LOSS (METHOD lora|full, LOSS sigmoid|ipo|simpo|orpo).

  * sigmoid, ipo: TRL's DPOTrainer, the same model, adapter start, pairs and batches (every
    step trains on all the pairs, so the batch is the same whatever the sampler's order);
  * simpo, orpo: the installed TRL's DPOTrainer has neither, so a plain PyTorch loop (padded
    rows, HF forward, torch AdamW) feeds the log-probabilities to TRL's own CPO loss (simpo),
    or runs TRL's own ORPOTrainer.concatenated_forward (its NLL over the chosen prompt and
    response) and odds_ratio_loss on a batch in TRL's layout (orpo).

Writes OUT/results.json: {case: {"shardtune": [step dicts], "reference": [step dicts]}}."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

STEPS, BETA = 20, 0.1
LR = {"lora": 5e-3, "full": 5e-4}  # smooth descent: larger full-model steps make rounding differences grow
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")


def shardtune_steps(model: str, pairs: Path, out: Path, method: str, loss: str, init: Path) -> list[dict]:
    from shardtune.recipes import dpo

    flags = ["--model_name", model, "--dataset", "preference_dataset", "--preference_dataset.data_path", str(pairs),
             "--preference_dataset.validation_path", str(pairs), "--run_validation", "False",
             "--output_dir", str(out), "--batch_size_training", str(sum(1 for _ in open(pairs))),
             "--num_epochs", str(STEPS), "--lr", str(LR[method]), "--lr_scheduler", "constant", "--weight_decay", "0",
             "--mixed_precision", "False", "--context_length", "512", "--save_metrics", "--log_every", "1",
             "--save_model", "False", "--data_cache_dir", "none", "--dpo_config.loss_type", loss,
             "--dpo_config.beta", str(BETA), "--fsdp_activation_checkpointing", "False"]
    if method == "lora":
        flags += ["--use_peft", "--peft_method", "lora", "--from_peft_checkpoint", str(init),
                  "--lora_config.lora_dropout", "0"]
    assert dpo.main(flags) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in KEYS} for r in rows if r["event"] == "step"]


def load_policy(model: str, method: str, init: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(init), is_trainable=True) if method == "lora" else base


def trl_steps(model: str, pairs: Path, out: Path, method: str, loss: str, init: Path) -> list[dict]:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records: list[dict] = []

    class Recorded(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            value = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                logged = self._metrics["train"]
                records.append({"loss": value.item(), **{k: logged[k][-1] for k in KEYS[1:]}})
            return value

    data = load_dataset("json", data_files=str(pairs), split="train")
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=len(data), num_train_epochs=STEPS,
                     learning_rate=LR[method], lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                     loss_type=[loss], beta=BETA, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, max_length=None, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    Recorded(model=load_policy(model, method, init), args=args, train_dataset=data,
             processing_class=tokenizer).train()
    return records


def trl_batch(examples: list[dict]) -> dict:
    """Pairs in the layout ORPOTrainer's collator gives: chosen_/rejected_ input_ids, attention_mask
    and labels (the prompt labelled -100), right-padded."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [e["prompt_ids"] + e[f"{side}_ids"] for e in examples]
        labels = [[-100] * len(e["prompt_ids"]) + e[f"{side}_ids"] for e in examples]
        width = max(map(len, seqs))
        batch[f"{side}_input_ids"] = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        batch[f"{side}_labels"] = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return batch


def hand_loop_steps(model: str, pairs: Path, method: str, loss: str, init: Path) -> list[dict]:
    """Padded rows through the HF model; the loss from TRL's own functions."""
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from shardtune.data.preference import source
    from shardtune.config.schema import preference_dataset
    from shardtune.data.records import BadRecords

    tokenizer = AutoTokenizer.from_pretrained(model)
    cfg = preference_dataset(data_path=str(pairs), validation_path=str(pairs))
    examples = source(cfg, "train").read(tokenizer, BadRecords())  # the ids test_preference checks against TRL's
    seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    starts = [len(e["prompt_ids"]) for e in examples] * 2
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    target = torch.zeros_like(ids, dtype=torch.bool)  # positions whose next token is a completion token
    for i, (s, p) in enumerate(zip(seqs, starts)):
        target[i, p - 1:len(s) - 1] = True
    policy = load_policy(model, method, init)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR[method], weight_decay=0.0)
    this = types.SimpleNamespace(beta=BETA, label_smoothing=0.0, simpo_gamma=0.5, loss_type="simpo", alpha=0.0,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")),
                                 # what ORPOTrainer.concatenated_forward reads of its trainer
                                 concatenated_inputs=ORPOTrainer.concatenated_inputs,
                                 get_batch_logps=ORPOTrainer.get_batch_logps, is_encoder_decoder=False,
                                 padding_value=0, aux_loss_enabled=False)
    orpo_batch = trl_batch(examples)
    n = len(examples)
    records = []
    for _ in range(STEPS):
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * target[:, :-1]
        lengths = target.sum(1).float()
        avg = token_logps.sum(1) / lengths
        if loss == "simpo":
            losses, rew_c, rew_r = CPOTrainer.cpo_loss(this, avg[:n], avg[n:])
            value = losses.mean()
        else:  # orpo, as ORPOTrainer.get_batch_loss_metrics: TRL's ORPO beta is shardtune's orpo_alpha (0.1)
            avg_c, avg_r, _, _, nll = ORPOTrainer.concatenated_forward(this, policy, orpo_batch)
            losses, rew_c, rew_r, _, _ = ORPOTrainer.odds_ratio_loss(this, avg_c, avg_r)
            value = nll - losses.mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        records.append({"loss": value.item(), "rewards/chosen": rew_c.mean().item(),
                        "rewards/rejected": rew_r.mean().item(), "rewards/margins": (rew_c - rew_r).mean().item()})
    return records


def main(argv: list[str]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, pairs, out = argv[0], Path(argv[1]), Path(argv[2])
    torch.manual_seed(0)
    init = out / "initial_adapter"  # both sides start from these LoRA weights (B = 0: the reference is the base)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                   LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
                   ).save_pretrained(str(init))
    results = {}
    for case in argv[3:]:
        method, loss = case.split(":")
        ours = shardtune_steps(model, pairs, out / f"{method}-{loss}", method, loss, init)
        if loss in ("sigmoid", "ipo"):
            reference = trl_steps(model, pairs, out / f"trl-{method}-{loss}", method, loss, init)
        else:
            reference = hand_loop_steps(model, pairs, method, loss, init)
        results[case] = {"shardtune": ours, "reference": reference}
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
