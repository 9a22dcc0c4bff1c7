"""The streamed full-model save (checkpoint.outputs.write_full_model) in one process: what
the 2-rank runs of tests/integration/test_methods.py check end to end, here with a file
limit small enough that a tiny model takes several files."""
import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.checkpoint.outputs import write_full_model
from shardtune.device import Dist
from shardtune.modeling.tiny import build_tiny


def test_bf16_files_in_hf_sharded_layout_load_to_the_same_weights(tmp_path):
    source = build_tiny(str(tmp_path / "tied"), intermediate_size=128, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    one_process = Dist(0, 0, 1, 1, torch.device("cpu"), "gloo")
    write_full_model(model, AutoTokenizer.from_pretrained(source), out, one_process, torch.bfloat16,
                     shard_bytes=100_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 2 and files == sorted(set(index["weight_map"].values()))
    assert all(name.endswith(f"-of-{len(files):05d}.safetensors") for name in files)
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as the embedding
    for name in files:
        with safe_open(out / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight
    trained = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name].to(torch.bfloat16)), name
