"""Today's model families (Llama 3, Mistral, Qwen3, Gemma), tiny and random-init, built by
AutoModelForCausalLM at test time: LoRA under FSDP2 gives the same losses at 1 and 2 ranks,
the adapter trains and reloads in plain peft to the trained logits, and a full fine-tune
reloads in plain transformers to the trained logits. Plus the model-level checks behind
that (non-persistent buffers, decoder layers) and the one-line errors for what is not
supported."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, T5Config

from conftest import FAMILIES, REPO, check, error_lines, read_metrics, run_cli, torchrun
from shardtune import adapters, parallel
from shardtune.modeling import load as model_lib
from shardtune.config.parse import parse_args
from shardtune.errors import UserError

WORKER = REPO / "tests" / "workers" / "train_probe.py"
STEPS = 3
COMMON = ["--enable_fsdp", "--num_epochs", "1", "--max_train_step", str(STEPS), "--context_length", "128",
          "--num_workers_dataloader", "0", "--run_validation", "False", "--save_metrics", "--log_every", "1"]
# all-linear: LoRA on every projection of every family, not only the ones q_proj,v_proj names
LORA = ["--use_peft", "--peft_method", "lora", "--lora_config.target_modules", "all-linear",
        "--lora_config.lora_dropout", "0", "--lr", "1e-2"]
FULL = ["--lr", "1e-3"]


@pytest.fixture(scope="module")
def all_runs(family_models, tmp_path_factory):
    """Two launches for every family together (a launch's start-up costs more than a tiny
    run): LoRA at 1 rank (global batch 2); then at 2 ranks LoRA, then a full fine-tune
    (global batch 2). family -> {run name: output directory}."""
    tmp = tmp_path_factory.mktemp("family-runs")
    one_rank, two_ranks, dirs = [], [], {}
    for family in FAMILIES:
        model, d = family_models(family), {k: tmp / family / k for k in ("lora1", "lora2", "full2")}
        dirs[family] = d

        def run(name, flags, batch):
            return ["--then", str(d[name].parent / f"{name}.safetensors"), *COMMON, *flags, "--model_name", str(model),
                    "--output_dir", str(d[name]), "--batch_size_training", str(batch)]

        one_rank += run("lora1", LORA, 2)
        two_ranks += run("lora2", LORA, 1) + run("full2", FULL, 1)
    check(torchrun(1, WORKER, one_rank[1:]))
    check(torchrun(2, WORKER, two_ranks[1:]))
    return dirs


@pytest.fixture
def runs(all_runs, family_model):
    return all_runs[family_model.name]


def _reference_logits(model_dir, probe, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=probe).logits


def test_lora_losses_match_at_one_and_two_ranks(runs):
    one = [s["loss"] for s in read_metrics(runs["lora1"])[0]]
    two = [s["loss"] for s in read_metrics(runs["lora2"])[0]]
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    assert one[0] != one[-1]  # it trained


@pytest.mark.parametrize("world", [1, 2])
def test_adapter_reproduces_trained_logits(runs, family_model, world):
    out = runs[f"lora{world}"]
    probe = load_file(out.parent / f"lora{world}.safetensors")
    logits = _reference_logits(family_model, probe["probe"], adapter=out)
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5
    base = _reference_logits(family_model, probe["probe"])
    assert (base - probe["logits"]).abs().max().item() > 1e-4  # training changed the model


def test_adapter_trains_away_from_zero(runs):
    """peft initialises lora_B to zero; with a broken input (Gemma's embed_scale left
    uninitialised) it stays zero and training looks fine."""
    saved = load_file(runs["lora2"] / "adapter_model.safetensors")
    config = json.loads((runs["lora2"] / "adapter_config.json").read_text())
    targets = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}  # peft lists resolved names
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7  # 2 layers x 7 projections
    assert all(v.abs().sum() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.abs().sum()]


def test_full_finetune_reloads_to_trained_logits(runs):
    out = runs["full2"]
    probe = load_file(out.parent / "full2.safetensors")
    logits = _reference_logits(out, probe["probe"])
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5
    assert len(read_metrics(out)[0]) == STEPS


# ---- model level, in this process ---------------------------------------------------------

def _meta_model(model_dir, *flags):
    cfgs = parse_args(["--model_name", str(model_dir), *flags])
    spec = model_lib.load_spec(str(model_dir))
    model = model_lib.build_meta_model(spec)
    if cfgs.train.use_peft:
        model = adapters.wrap(model, cfgs)
        return model, spec, adapters.init_new_params(model, "lora", 0)
    return model, spec, {}


def test_every_buffer_matches_transformers(family_model):
    """Materialised from the meta device, every buffer (RoPE inv_freq with llama3 scaling,
    Gemma's embed_scale) equals what from_pretrained gives; the skeleton they come from
    holds no parameter storage (it would if torch stopped routing parameters through
    Module.register_parameter)."""
    model, spec, new = _meta_model(family_model, "--use_peft")
    model_lib.materialize(model, spec, torch.device("cpu"), new)
    reference = dict(AutoModelForCausalLM.from_pretrained(family_model, dtype=torch.float32).named_buffers())
    got = {model_lib.checkpoint_key(n, reference): b for n, b in model.named_buffers()}
    assert got.keys() == reference.keys() and reference
    for name, buf in got.items():
        assert buf.dtype == reference[name].dtype and torch.equal(buf, reference[name]), name
    skeleton = model_lib._buffer_skeleton(spec)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())


def test_buffer_that_cannot_be_rebuilt_is_a_user_error(family_model):
    model, spec, _ = _meta_model(family_model)
    model.model.register_buffer("mystery", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(UserError, match="cannot rebuild buffer model.mystery"):
        model_lib.materialize(model, spec, torch.device("cpu"), {})


def test_decoder_layers_and_default_lora_targets(family_model):
    model, _, _ = _meta_model(family_model)
    assert len(parallel.decoder_layers(model)) == 2
    # the documented default q_proj,v_proj exists in every family
    peft_model, _, _ = _meta_model(family_model, "--use_peft")
    assert len([n for n, _ in peft_model.named_modules() if n.endswith(("q_proj.lora_A", "v_proj.lora_A"))]) == 4
    for m in model.modules():
        m._no_split_modules = None
    with pytest.raises(UserError, match=f"decoder layers of this {model.config.model_type} model"):
        parallel.decoder_layers(model)


# ---- what is not supported: one line, before training ----------------------------------

def _one_line_error(capfd, model_dir, out, *flags):
    """`shardtune finetune` in this process on model_dir: its one error line."""
    code, _, err = run_cli(capfd, ["finetune", "--use_peft", "--model_name", str(model_dir), "--output_dir", str(out),
                                   "--max_train_step", "1", "--num_workers_dataloader", "0", *flags])
    lines = error_lines(err)
    assert code != 0 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_unsupported_architectures(tmp_path, capfd):
    t5 = tmp_path / "t5"
    T5Config(vocab_size=128, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(t5)
    line = _one_line_error(capfd, t5, tmp_path / "o1")
    assert "t5 is not a decoder-only causal language model" in line
    assert "AutoModelForCausalLM builds without remote code" in line
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my_custom", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    assert "does not know model type 'my_custom'" in _one_line_error(capfd, custom, tmp_path / "o2")


def test_tokenizer_bigger_than_the_embedding(tmp_path, family_models, shared_data, capfd):
    model = family_models("llama3")
    line = _one_line_error(capfd, model, tmp_path / "o", "--tokenizer_name", str(shared_data / "tokenizers" / "llama2"))
    assert "the tokenizer has 32000 tokens" in line
    assert "embedding has 1024 rows" in line
