"""Convert and merge, behind `shardtune convert` and `shardtune merge`: one process, no torchrun.

convert: a step checkpoint -> a PEFT adapter directory (PEFT runs) or a Hugging Face
model directory (full fine-tuning). DCP reads the shards of any world size into full
tensors sized from its metadata; no model is sharded and no process group is needed.
merge: a LoRA adapter folded into its base -> a Hugging Face model directory.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..config.schema import Configs, default_configs
from ..errors import UserError
from . import state as ckpt_state
from .outputs import check_writable, fresh_tmp, publish_files, save_peft_files, used_by_a_run, write_hf_model


def _configs(saved: dict) -> Configs:
    cfgs = default_configs()
    for cfg in cfgs.all():
        for name, value in saved.get(type(cfg).__name__, {}).items():
            setattr(cfg, name, value)
    return cfgs


def read_trainable(ckpt: ckpt_state.Checkpoint) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the checkpoint's parameters, by parameter name."""
    reader = dcp.FileSystemReader(str(ckpt.path / "dcp"))
    metadata = reader.read_metadata()
    prefix = "model."
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and hasattr(meta, "size")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader)
    return {key[len(prefix):]: value for key, value in tensors.items()}


def _claim(out: Path) -> None:
    check_writable(str(out), "OUT")
    used = used_by_a_run(out)
    if used:
        raise UserError(f"{out} already holds {', '.join(used)}; pick an empty output directory")


def convert(checkpoint: str, out_dir: str) -> Path:
    from .. import adapters
    from ..modeling import load as model_lib

    ckpt = ckpt_state.open_checkpoint(Path(checkpoint))
    out = Path(out_dir)
    _claim(out)
    cfgs = _configs(ckpt.info.config)
    spec = model_lib.load_spec(ckpt.info.model.path)
    params = read_trainable(ckpt)
    model = model_lib.build_meta_model(spec)
    method = ckpt.info.peft_method
    if method:
        peft_model = adapters.wrap(model, cfgs)
        adapter_state = adapters.adapter_state(method)
        peft_config = copy.deepcopy(peft_model.peft_config["default"])
        peft_config.base_model_name_or_path = str(spec.model_dir)
        tensors = adapter_state(params) if adapter_state else _peft_tensors(peft_model, params)
        tmp = fresh_tmp(out, "adapter")
        save_peft_files(peft_config, tensors, tmp)
        publish_files(tmp, out)
        return out
    model_lib.materialize(model, spec, torch.device("cpu"), params)  # frozen layers from the base
    write_hf_model(model, model.state_dict(), model_lib.load_tokenizer(str(spec.model_dir)), out)
    return out


def _peft_tensors(peft_model, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=params)


def merge(model_name: str, peft_model_dir: str, out_dir: str) -> Path:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from ..modeling.load import load_tokenizer, resolve_model_dir

    out = Path(out_dir)
    _claim(out)
    try:
        peft_type = PeftConfig.from_pretrained(peft_model_dir).peft_type
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the adapter in {peft_model_dir}: {str(err).splitlines()[0]}") from None
    if str(peft_type).split(".")[-1] != "LORA":
        raise UserError(f"{peft_model_dir} is a {peft_type} adapter; only LoRA merges into the base weights "
                        "(load the others on their base with peft)")
    model_dir = resolve_model_dir(model_name)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, peft_model_dir).merge_and_unload()
    write_hf_model(merged, merged.state_dict(), load_tokenizer(str(model_dir)), out)
    return out
