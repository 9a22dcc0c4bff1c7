"""Model stage: tokenizer, a meta-device model, and loading weights into (sharded) params.

The model is built on the meta device, wrapped and sharded, and only then
materialised: each rank allocates just its own shards and reads only their rows from the
safetensors files (`get_slice`), so host RAM never holds the full model per rank and the
bytes read per node fall with the number of ranks sharing it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .. import _compat
from ..errors import UserError
from .attention import PACKED

log = logging.getLogger(__name__)

SUPPORTED = ("shardtune trains decoder-only models that transformers' AutoModelForCausalLM builds without "
             "remote code (tested: llama, mistral, qwen3, gemma)")


def resolve_model_dir(name: str) -> Path:
    """A local HF directory, or a hub id downloaded to the HF cache (online users)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; --model_name must be a Hugging Face model directory")
        return path
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") != 1 or path.exists()
    if looks_local:
        raise UserError(f"model directory {name} does not exist; pass an existing Hugging Face model directory as --model_name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:
        raise UserError(f"model {name!r} is not a local directory and could not be fetched from the hub ({type(err).__name__})") from None


def load_tokenizer(name: str):
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {name}: {str(err).splitlines()[0]}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"the tokenizer in {name} has neither a pad nor an eos token; shardtune pads with one "
                            "of them: add an eos_token (or pad_token) to its tokenizer_config.json")
        tok.pad_token = tok.eos_token  # Llama ships without a pad token
    return tok


class WeightFiles:
    """Tensor-at-a-time reader over a model directory's safetensors files."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            self.files = {k: model_dir / v for k, v in _weight_map(index).items()}
        elif single.is_file():
            self.files = {k: single for k in safetensors_keys(single)}
        else:
            raise UserError(
                f"{model_dir} has no model.safetensors; shardtune only reads safetensors "
                "(pickle checkpoints can run code): convert with `save_pretrained(safe_serialization=True)`"
            )
        for path in sorted(set(self.files.values())):  # headers only: cheap, and fails before training
            safetensors_keys(path)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [start, stop) of its first dimension (read from disk alone)."""
        with self._open(key) as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]

    def shape(self, key: str) -> tuple[int, ...]:
        with self._open(key) as f:
            return tuple(f.get_slice(key).get_shape())

    @contextlib.contextmanager
    def _open(self, key: str):
        path = self.files[key]
        try:
            with safe_open(path, "pt") as f:
                yield f
        except SafetensorError as err:
            raise UserError(f"cannot read tensor {key} from {path} ({err}); the file is damaged or "
                            "does not match its index: download or save the model again") from None


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file; safetensors checks that the header is whole and
    that the data it describes is all there (a truncated download fails here)."""
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); it is damaged or truncated: "
                        "download or save it again") from None


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err}); it needs a "
                        '"weight_map" of tensor name -> file: download or save the model again') from None
    missing = sorted({name for name in weight_map.values() if not (index.parent / name).is_file()})
    if missing:
        raise UserError(f"{index} names {', '.join(missing)}, which {index.parent} does not have; "
                        "download the missing shards or save the model again")
    return weight_map


def checkpoint_key(param_name: str, ckpt: WeightFiles) -> str | None:
    """Map a (PEFT-wrapped) parameter name to the base checkpoint's key. PEFT adds a
    prefix (base_model.model.) and wrapper segments: LoRA's .base_layer, the adaption
    prompt's .model around the original attention."""
    name = param_name.replace(".base_layer.", ".")
    for prefix in ("base_model.model.", "base_model.", ""):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        for candidate in (rest, rest.replace(".self_attn.model.", ".self_attn.")):
            if candidate in ckpt:
                return candidate
    return None


def checked_key(param_name: str, param: torch.Tensor, ckpt: WeightFiles, model_dir: Path) -> str:
    """The checkpoint key of a parameter, whose tensor has the parameter's (global) shape."""
    key = checkpoint_key(param_name, ckpt)
    if key is None:
        raise UserError(f"{model_dir}: checkpoint has no tensor for parameter {param_name}")
    _check_shape(ckpt.shape(key), param)
    return key


@dataclass
class ModelSpec:
    model_dir: Path
    config: object
    dtype: torch.dtype = torch.float32
    # the config as read from disk, hashed before anything builds a model from it (from_config
    # writes its dtype and attention choices into the config): what a resume must match
    fingerprint: str = ""


def build_meta_model(spec: ModelSpec) -> torch.nn.Module:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(spec.config, dtype=spec.dtype, attn_implementation=PACKED)
    return model


def hold_trainable_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Trainable parameters in `dtype` (mixed precision's fp32 master weights), frozen ones
    in the dtype the model was built in. In place, so tied parameters stay tied."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def load_spec(model_name: str) -> ModelSpec:
    model_dir = resolve_model_dir(model_name)
    model_type = _declared_model_type(model_dir)
    if model_type is not None and model_type not in CONFIG_MAPPING:
        raise UserError(f"{model_dir}: transformers does not know model type {model_type!r} (a model that brings "
                        f"its own code, which shardtune never runs?); {SUPPORTED}")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {model_dir}/config.json: {str(err).splitlines()[0]}") from None
    if getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{model_dir}: {config.model_type} is not a decoder-only causal language model; {SUPPORTED}")
    WeightFiles(model_dir)  # a damaged or truncated weights file fails now, not after data preparation
    fingerprint = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return ModelSpec(model_dir, config, fingerprint=fingerprint)


def _declared_model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # AutoConfig reports what is wrong with the file


def check_vocab(tokenizer, spec: ModelSpec) -> None:
    """Token ids past the embedding table would fail as an IndexError in the first forward."""
    rows = spec.config.get_text_config().vocab_size
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but {spec.model_dir}'s embedding has {rows} rows; "
                        "pass the model's own tokenizer as --tokenizer_name (or none, to use the model's)")


@torch.no_grad()
def materialize(model: torch.nn.Module, spec: ModelSpec, device: torch.device,
                new_params: dict[str, torch.Tensor], offloaded: bool = False,
                skip: set[str] = frozenset()) -> None:
    """Allocate (sharded) storage on `device` and fill it from the checkpoint and the
    adapter's initial values. Works for plain and FSDP2 (DTensor) parameters alike.
    With FSDP2 CPU offload the sharded parameters live in host memory. Parameters named
    in `skip` are allocated but not filled (NF4 base weights: quant.LayerQuantizer.load)."""
    ties = _tied_parameters(model)
    model.to_empty(device="cpu" if offloaded else device)
    for module, attr, source, source_attr in ties:  # to_empty gives each owner its own copy
        setattr(module, attr, getattr(source, source_attr))
    ckpt = WeightFiles(spec.model_dir)
    for name, param in model.named_parameters():
        if name in skip:
            continue
        if name in new_params:
            _copy_full(param, new_params[name])
            continue
        key = checked_key(name, param, ckpt, spec.model_dir)  # tied parameters are listed once, under their first name
        rows = local_rows(param)
        if rows is None:
            _copy_full(param, ckpt.get(key))
        else:
            param.to_local().copy_(ckpt.get(key, rows))
    _fill_buffers(model, spec, ckpt, device)


def _tied_parameters(model: torch.nn.Module) -> list[tuple]:
    """(module, attr, source module, source attr) for every parameter shared with an
    earlier owner, e.g. lm_head.weight tied to embed_tokens.weight."""
    first: dict[int, tuple] = {}
    ties = []
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in first:
                ties.append((module, attr, *first[id(p)]))
            else:
                first[id(p)] = (module, attr)
    return ties


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The rows [start, stop) of dim 0 that this rank's shard of `param` holds, when every
    sharded mesh dimension shards dim 0 (FSDP2: Shard(0), with Replicate across HSDP
    replicas); None for a plain tensor or any other layout (read whole, sliced in memory).
    Shard(0) splits as torch.chunk does: ceil(rows / shards) rows each, the last ranks
    shorter or empty. tests/integration/test_load.py compares every shard with distribute_tensor's."""
    if not isinstance(param, DTensor):
        return None
    start, length = 0, param.shape[0]
    coordinate = param.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard(dim=0):
            return None
        chunk = -(-length // param.device_mesh.size(mesh_dim))
        offset = min(coordinate[mesh_dim] * chunk, length)
        start, length = start + offset, min(chunk, length - offset)
    if param.to_local().shape[0] != length:  # a layout this arithmetic does not know
        return None
    return start, start + length


def _check_shape(shape: tuple[int, ...], param: torch.Tensor) -> None:
    if tuple(shape) != tuple(param.shape):
        raise UserError(f"checkpoint tensor has shape {tuple(shape)}, model expects {tuple(param.shape)}")


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    _check_shape(full.shape, param)
    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the full tensor, so slice locally, no comms
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def _fill_buffers(model: torch.nn.Module, spec: ModelSpec, ckpt: WeightFiles, device: torch.device) -> None:
    """to_empty leaves every buffer uninitialised. Persistent ones are read from the checkpoint;
    the others (RoPE inv_freq with its scaling, Gemma's embed_scale, ...) are whatever the
    model's own constructors compute from the config, taken from a skeleton of the model."""
    skeleton = _buffer_skeleton(spec)
    reference = dict(skeleton.named_buffers())
    persistent = skeleton.state_dict(keep_vars=True).keys()  # public: exactly the persistent buffers (and params)
    for name, buf in list(model.named_buffers()):
        key = checkpoint_key(name, reference)
        if key is None or reference[key].is_meta:
            raise UserError(f"cannot rebuild buffer {name}: the model's constructor does not compute it from the "
                            f"config, and {spec.model_dir} does not hold it; {SUPPORTED}")
        value = ckpt.get(key) if key in persistent and key in ckpt else reference[key]
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, value.to(device=device, dtype=buf.dtype))


def _buffer_skeleton(spec: ModelSpec) -> torch.nn.Module:
    """The model built as build_meta_model does, but with only its parameters on the meta
    device: its buffers are computed for real, and cost next to nothing."""
    # on a copy of the config: from_config writes its choices (attention, dtype) into the
    # config it is given, and the model being trained shares spec.config
    with _compat.parameters_on_meta():
        return AutoModelForCausalLM.from_config(copy.deepcopy(spec.config), dtype=spec.dtype)


def load_quantized(spec: ModelSpec, quantization: str, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """8-bit or 4-bit (QLoRA, nf4) base weights through bitsandbytes; the 4-bit matmuls and
    the weights left unquantized (embeddings, norms) in `dtype`, the compute dtype."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--quantization needs bitsandbytes: pip install 'shardtune[quant]'") from None
    if quantization == "8bit":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(spec.model_dir, quantization_config=qconfig,
                                                dtype=dtype, device_map={"": device},
                                                attn_implementation=PACKED)
