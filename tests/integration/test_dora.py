"""DoRA (--lora_config.use_dora) under FSDP2: the same per-step losses at 1 and 2 ranks and
in an independent plain-peft DoRA loop from the same init; the magnitude of a fresh
adapter is computed from the loaded base weights (not from the meta device); the saved
adapter loads in plain peft and reproduces the trained logits; a checkpoint saved at 2
ranks resumes at 1, and the adapter merges into the base."""
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, SHIM, check, metric_events, plain_loop_losses, python, read_metrics, run_cli, step_losses, torchrun, assert_close
from shardtune.config.parse import parse_args
from shardtune.data import build_split
from shardtune.modeling.load import load_tokenizer

WORKER = REPO / "tests" / "workers" / "train_probe.py"
LR, WD, STEPS, GLOBAL_BATCH, SEED = 2e-3, 0.01, 5, 4, 42
TARGETS = ["q_proj", "v_proj"]


def _args(model, shared_data, out):
    return ["--use_peft", "--peft_method", "lora", "--lora_config.use_dora", "True", "--lora_config.lora_dropout", "0",
            "--model_name", str(model), "--output_dir", str(out), "--num_workers_dataloader", "0",
            "--samsum_dataset.data_path", str(shared_data / "samsum"), "--samsum_dataset.train_split", "validation",
            "--context_length", "300", "--run_validation", "False", "--num_epochs", "1",
            "--max_train_step", str(STEPS), "--lr", str(LR), "--weight_decay", str(WD), "--seed", str(SEED),
            "--save_metrics", "--log_every", "1"]


@pytest.fixture(scope="module")
def runs(tiny_model, shared_data, tmp_path_factory):
    """From a plain-peft DoRA init (non-zero B, so step 1 trains A too): 1 rank, 2 ranks;
    in the 2-rank launch also a fresh adapter (shardtune's own init) with lr 0, which keeps
    the initial magnitude, trained under --compile (peft's DoRA graph-breaks in dynamo, so
    the run must report its layers as partly eager), and the 2-rank run stopped after step 3
    that test_saved_at_two_ranks_resumes_at_one_and_merges resumes."""
    tmp = tmp_path_factory.mktemp("dora")
    torch.manual_seed(0)
    init = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for name, param in init.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    init.save_pretrained(tmp / "init")
    out = {k: tmp / k for k in ("one", "two", "fresh", "stopped")}

    def run(name, batch, *extra):
        return [str(tmp / f"{name}.safetensors"), *_args(tiny_model, shared_data, out[name]), "--enable_fsdp",
                "--batch_size_training", str(batch), *extra]

    from_init = ["--from_peft_checkpoint", str(tmp / "init")]
    check(torchrun(1, WORKER, run("one", GLOBAL_BATCH, *from_init)))
    check(torchrun(2, WORKER, run("two", GLOBAL_BATCH // 2, *from_init) + ["--then"]
                   + run("fresh", GLOBAL_BATCH // 2, "--lr", "0", "--weight_decay", "0", "--max_train_step", "1",
                       "--compile") + ["--then"] + run("stopped", GLOBAL_BATCH // 2, *from_init, "--max_train_step", "3")))
    out["init"] = tmp / "init"
    return out


def _reference_losses(tiny_model, shared_data, init_dir):
    cfgs = parse_args(_args(tiny_model, shared_data, "unused"))
    chunks = build_split(cfgs, load_tokenizer(str(tiny_model)), "train").dataset.chunks
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    return plain_loop_losses(model, chunks, STEPS, GLOBAL_BATCH, LR, WD, SEED)


def test_losses_match_across_world_sizes_and_plain_peft(runs, tiny_model, shared_data):
    one = [s["loss"] for s in read_metrics(runs["one"])[0]]
    two = [s["loss"] for s in read_metrics(runs["two"])[0]]
    ref = _reference_losses(tiny_model, shared_data, runs["init"])
    assert len(one) == len(two) == len(ref) == STEPS
    assert_close(one, two, rtol=1e-5)
    assert_close(two, ref, rtol=1e-5)
    assert ref[0] != ref[-1]


def test_fresh_magnitude_is_the_base_weight_norm(runs, tiny_model):
    """peft's fresh init has B = 0, so m = ||W|| per output row of the checkpoint's weight."""
    saved = load_file(runs["fresh"] / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in saved.items() if k.endswith("lora_magnitude_vector")}
    assert len(magnitudes) == 2 * len(TARGETS)  # 2 layers
    with safe_open(tiny_model / "model.safetensors", "pt") as f:
        for key, magnitude in magnitudes.items():
            weight = f.get_tensor(key.removeprefix("base_model.model.").replace("lora_magnitude_vector", "weight"))
            assert torch.allclose(magnitude, torch.linalg.norm(weight, dim=1), rtol=0, atol=1e-6), key


def test_compile_that_falls_back_is_reported(runs):
    """--compile never runs eagerly in silence: DoRA's layers graph-break (peft asks a
    weight's class for its module name, which dynamo cannot trace), and the metrics say so
    once, with the cause."""
    compiled = metric_events(runs["fresh"], "compile")
    assert len(compiled) == 1 and compiled[0]["step"] == 1, compiled
    assert compiled[0]["compiled"] is False and compiled[0]["graph_breaks"], compiled


@pytest.mark.parametrize("name", ["one", "two", "fresh"])
def test_adapter_reproduces_trained_logits(runs, tiny_model, name):
    probe = load_file(runs[name].parent / f"{name}.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), runs[name])
    assert model.peft_config["default"].use_dora
    with torch.no_grad():
        logits = model.eval()(input_ids=probe["probe"]).logits
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5


def test_saved_at_two_ranks_resumes_at_one_and_merges(runs, tiny_model, shared_data, tmp_path, capfd):
    """DoRA's magnitude vectors go through the DCP checkpoint too: saved by 2 FSDP ranks after
    step 3 and resumed by one process, the run has the uninterrupted 2-rank run's losses and
    adapter; merged into the base, it gives that run's logits in plain transformers."""
    out = runs["stopped"]
    args = _args(tiny_model, shared_data, out) + ["--from_peft_checkpoint", str(runs["init"])]
    check(python(SHIM, args + ["--batch_size_training", "4", "--resume", "auto"]))
    assert_close(step_losses(out), step_losses(runs["two"]), rtol=1e-5)
    resumed, uninterrupted = (load_file(d / "adapter_model.safetensors") for d in (out, runs["two"]))
    assert resumed.keys() == uninterrupted.keys() and any("magnitude" in k for k in resumed)
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-5

    merged = tmp_path / "merged"
    code, _, err = run_cli(capfd, ["merge", "--model_name", tiny_model, "--peft_model", out, "--output_dir", merged])
    assert code == 0, err
    probe = load_file(runs["two"].parent / "two.safetensors")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=probe["probe"]).logits
    assert (logits - probe["logits"]).abs().max().item() <= 1e-4
