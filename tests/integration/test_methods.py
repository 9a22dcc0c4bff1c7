"""The PEFT-method x world-size matrix: each cell trains (loss goes down) and its saved
artifact, reloaded with plain transformers/peft, reproduces the trained logits; with
--checkpoint_type FULL_STATE_DICT the step checkpoint's hf/ holds the same, loadable."""
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, check, python, read_metrics, torchrun

WORKER = REPO / "tests" / "workers" / "train_probe.py"
METHODS = {
    "lora": ["--use_peft", "--peft_method", "lora"],
    "llama_adapter": ["--use_peft", "--peft_method", "llama_adapter"],
    "prefix": ["--use_peft", "--peft_method", "prefix"],
    "none": [],  # full fine-tuning
}


def _method_run(method, world, tiny_model, out):
    # the bundled sample: 3 short epochs, and the held-out loss must fall
    return [str(out.parent / f"{out.name}.safetensors"), *METHODS[method],
            "--model_name", str(tiny_model), "--output_dir", str(out), "--num_workers_dataloader", "0",
            "--batch_size_training", str(4 // world), "--context_length", "256", "--num_epochs", "3",
            "--lr", "1e-3" if method == "none" else "1e-2", "--val_batch_size", "4", "--save_metrics",
            "--log_every", "4", "--checkpoint_type", "FULL_STATE_DICT"]


def _tied_run(tied, world, out):
    return [str(out.parent / f"{out.name}.safetensors"), "--model_name", str(tied), "--output_dir", str(out),
            "--num_workers_dataloader", "0", "--batch_size_training", str(4 // world), "--context_length", "128",
            "--num_epochs", "1", "--max_train_step", "4", "--lr", "1e-2", "--run_validation", "False",
            "--checkpoint_type", "FULL_STATE_DICT"]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The whole matrix in two launches (a launch's start-up costs more than a tiny run): at
    1 rank, then at 2 ranks under FSDP, every method, then full fine-tuning of a tied-embedding
    model (at 2 ranks also in bf16 compute). Returns {(name, world): output directory}."""
    from shardtune.modeling.tiny import build_tiny

    tmp = tmp_path_factory.mktemp("methods")
    # Llama 3.2-style tied input/output embeddings
    tied = build_tiny(str(tmp / "tied-model"), intermediate_size=128, tie_word_embeddings=True)
    dirs, launches = {}, {1: [], 2: []}
    for world, launch in launches.items():
        fsdp = ["--enable_fsdp"] if world > 1 else []
        for method in METHODS:
            dirs[method, world] = tmp / f"{method}-{world}"
            launch += ["--then", *_method_run(method, world, tiny_model, dirs[method, world]), *fsdp]
        dirs["tied", world] = tmp / f"tied-{world}"
        launch += ["--then", *_tied_run(tied, world, dirs["tied", world]), *fsdp]
    dirs["tied_bf16", 2] = tmp / "tied_bf16-2"
    launches[2] += ["--then", *_tied_run(tied, 2, dirs["tied_bf16", 2]), "--enable_fsdp", "--mixed_precision", "True",
                    "--max_train_step", "2"]
    check(python(WORKER, launches[1][1:]))
    check(torchrun(2, WORKER, launches[2][1:]))
    return dirs


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_reloads(method, world, runs, tiny_model):
    out = runs[method, world]
    steps, epochs = read_metrics(out)
    assert len(epochs) == 3 and len(steps) >= 30
    eval_losses = [e["eval_loss"] for e in epochs]
    assert eval_losses[2] < eval_losses[0], eval_losses
    assert epochs[2]["train_loss"] < epochs[0]["train_loss"], epochs

    # --checkpoint_type FULL_STATE_DICT: the last step checkpoint holds the final weights in
    # hf/, as output_dir does, and from_pretrained loads them from there
    hf = sorted((out / "checkpoints").glob("*/step_*"))[-1] / "hf"
    weights = "model.safetensors" if method == "none" else "adapter_model.safetensors"
    final, exported = load_file(out / weights), load_file(hf / weights)
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    probe = load_file(out.parent / f"{out.name}.safetensors")
    with torch.no_grad():
        if method == "none":
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        else:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), hf)
        logits = model.eval()(input_ids=probe["probe"]).logits
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("world", [1, 2])
def test_tied_embeddings_stay_tied_in_full_finetuning(world, runs):
    """Tied input/output embeddings: training must update one shared matrix, so the saved
    model (which HF re-ties on load) reproduces the trained logits. At 2 ranks the same
    launch also trains with bf16 compute: the model is saved in bf16."""
    out = runs["tied", world]
    if world == 2:
        _saved_in_bf16(runs["tied_bf16", 2])
    probe = load_file(out.parent / f"{out.name}.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    with torch.no_grad():
        logits = model(input_ids=probe["probe"]).logits
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5


def _saved_in_bf16(out):
    """The final model of a --mixed_precision run: its fp32 master weights (the last step
    checkpoint's) rounded to bf16, config.json saying so, loadable as it is."""
    import json

    from shardtune.checkpoint import state as ckpt_state
    from shardtune.checkpoint.convert import read_trainable

    saved = load_file(out / "model.safetensors")
    master = read_trainable(ckpt_state.open_checkpoint(sorted((out / "checkpoints").glob("*/step_*"))[-1]))
    assert master["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" not in saved
    assert saved.keys() <= master.keys() and all(torch.equal(saved[k], master[k].to(torch.bfloat16)) for k in saved)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
