"""`shardtune plan`: peak memory per rank of a fine-tune, predicted before launch.

    shardtune plan --model_name 7B --enable_fsdp --use_peft --peft_method lora \\
        --world_size 8 --device_memory 80GiB

It takes finetune's own flags (same parser, same configs) plus the launch: --world_size,
--nnodes, --device (cuda or cpu) and --device_memory. The prediction is analytic: it
counts what the recipe allocates, from the model's shape alone (nothing is loaded):

  parameters   the sharded (or replicated) weights: trained ones in their storage dtype,
               frozen ones in the compute dtype (parallel.Precision.frozen), plus FSDP's
               unsharded compute-dtype copies while a layer runs (the root module's
               embeddings and head stay gathered through forward and backward)
  gradients    the trainable parameters' sharded gradients (an adapter's stay unsharded
               across accumulating micro-batches), plus the root's unsharded ones
  optimizer    AdamW: 2 states of the parameter dtype; anyprecision: 2 fp32 states, and a
               bf16 Kahan buffer when the weights are bf16
  activations  what autograd saves per token in each decoder layer (counted tensor by
               tensor for Llama's layer, below), at the start of backward; with
               activation checkpointing, each layer's input plus one replayed layer; and
               the loss: 12 bytes per vocabulary entry (logits, their log-softmax and its
               gradient) for one chunk of at most loss.CE_CHUNK_TOKENS labelled positions
               (an upper bound: only labelled positions reach the head)
  overhead     cuda: 1 GiB (context, NCCL, allocator slack); cpu: the resident memory of
               a process that imported what a rank imports, measured here
Peak = parameters + optimizer + max(activations + the head's gradient, all gradients): the
activations are freed layer by layer as backward produces the gradients. Loading is not a
peak: beyond its shards a rank holds one checkpoint tensor at a time, only its own rows of
a sharded one (NF4 base weights included: quant.LayerQuantizer.load).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config.parse import parse_args
from ..config.schema import PEFT_METHODS, Configs
from ..errors import UserError, exit_on_user_error
from ..modeling.loss import CE_CHUNK_TOKENS

GiB = 2**30

EXAMPLE = """example:
  shardtune plan --model_name 7B --enable_fsdp --use_peft --peft_method lora \\
      --world_size 8 --device_memory 80GiB --batch_size_training 4 --context_length 4096

Every finetune flag is accepted (shardtune finetune --help lists them); --model_name is a
model directory (its config.json) or one of: {names}."""


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a Llama-family decoder."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:  # keys: LINEARS
        """One decoder layer's linear layers: name -> (in, out)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden  # + two RMSNorms

    def root_params(self) -> int:
        """Embeddings, final norm and output head: FSDP's root module."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()


def _llama(vocab, hidden, intermediate, layers, heads, kv_heads) -> ModelShape:
    return ModelShape(vocab, hidden, intermediate, layers, heads, kv_heads, hidden // heads)


# The public config.json of each model (meta-llama on the Hugging Face hub).
KNOWN_MODELS = {
    "7B": _llama(32000, 4096, 11008, 32, 32, 32),  # Llama-2-7b-hf
    "13B": _llama(32000, 5120, 13824, 40, 40, 40),  # Llama-2-13b-hf
    "70B": _llama(32000, 8192, 28672, 80, 64, 8),  # Llama-2-70b-hf
    "Llama-3-8B": _llama(128256, 4096, 14336, 32, 32, 8),  # Meta-Llama-3-8B
    "Llama-3-70B": _llama(128256, 8192, 28672, 80, 64, 8),  # Meta-Llama-3-70B
}


def model_shape(name: str) -> ModelShape:
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    config_file = Path(name) / "config.json"
    if not config_file.is_file():
        raise UserError(f"--model_name {name}: no config.json there; pass a model directory or one of "
                        f"{', '.join(KNOWN_MODELS)}")
    cfg = json.loads(config_file.read_text())
    try:
        heads = cfg["num_attention_heads"]
        return ModelShape(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"],
                          cfg["num_hidden_layers"], heads, cfg.get("num_key_value_heads") or heads,
                          cfg.get("head_dim") or cfg["hidden_size"] // heads,
                          bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as err:
        raise UserError(f"{config_file} has no {err.args[0]}; plan needs a decoder-only (Llama-family) config") from None


def check_nf4_shards(cfgs: Configs, shape: ModelShape, launch: Launch) -> None:
    """QLoRA under FSDP2 refuses a weight whose shards do not hold whole NF4 blocks (hidden 896
    at any even world size, as Qwen2.5-0.5B): say so here, as the run would, before a launch."""
    if cfgs.train.quantization != "4bit" or not cfgs.train.enable_fsdp:
        return
    from ..modeling import quant

    weights = {name: (d_out, d_in) for name, (d_in, d_out) in shape.linears().items()}  # each base linear
    quant.check_fits(weights, resolve_setup(cfgs, launch).shard)


@dataclass(frozen=True)
class Launch:
    world_size: int = 1
    nnodes: int = 1
    device: str = "cuda"  # cuda | cpu
    overhead: int | None = None  # bytes; None = the default for the device
    label_share: float = 1.0  # share of positions with labels (1.0: the upper bound)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank at the peak; `host` is what CPU offload keeps off the device."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    peak: int
    host: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# ---- the model of memory --------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """The choices of a run that memory depends on, resolved from the configs."""

    storage: int  # bytes per stored trainable weight (and gradient)
    frozen: int  # bytes per stored frozen weight (the compute dtype's under mixed precision)
    compute: int  # bytes per activation element
    trainable_linears: frozenset  # linear names trained in full (full fine-tuning)
    lora_linears: frozenset  # linear names with a LoRA adapter
    lora_rank: int
    lora_dropout: bool
    micro_batch: int
    context: int
    shard: int  # ranks a parameter is sharded over (1 = replicated)
    fsdp: bool
    reshard: bool  # FULL_SHARD frees a layer's gathered weights after its forward
    ddp: bool
    checkpointing: bool
    offload: bool
    deferred_reduce: bool  # PEFT under FSDP with accumulation: unsharded gradients kept until the last micro-batch
    optimizer_bytes: int  # optimizer state bytes per trainable parameter
    quant_bytes: float | None  # bytes per base linear weight when quantized


def resolve_setup(cfgs: Configs, launch: Launch) -> Setup:
    """The recipe's own decisions (precision, mesh, adapter targets), taken from the library
    functions the recipe calls, so the plan cannot drift from what a run does."""
    from .. import parallel
    from ..adapters import lora
    from ..config.validate import check_supported, resolve_batching

    check_supported(cfgs)
    t, f = cfgs.train, cfgs.fsdp
    batching = resolve_batching(cfgs)
    if launch.world_size < 1 or launch.nnodes < 1 or launch.world_size % launch.nnodes:
        raise UserError(f"--world_size {launch.world_size} must be a positive multiple of --nnodes {launch.nnodes}")
    world = launch.world_size
    # an accelerator is taken to have bf16 units, as the recipe's Dist reports for CUDA
    precision = parallel.resolve_precision(cfgs, fast_bf16=launch.device != "cpu", log_choice=False)
    storage, compute = precision.storage.itemsize, precision.compute.itemsize
    names = frozenset(LINEARS)
    lora_cfg = cfgs.peft["lora_config"]
    lora_linears = lora.targeted(lora_cfg, names) if t.use_peft and t.peft_method == "lora" else frozenset()
    shard = parallel.mesh_shape(f, world, world // launch.nnodes)[-1] if t.enable_fsdp else 1
    anyprecision = f.optimizer.lower() == "anyprecision"
    checkpointing = (t.enable_fsdp and f.fsdp_activation_checkpointing
                     and (not t.use_peft or PEFT_METHODS[t.peft_method].activation_checkpointing))
    return Setup(
        storage=storage, frozen=precision.frozen.itemsize, compute=compute, trainable_linears=frozenset() if t.use_peft else names,
        lora_linears=lora_linears, lora_rank=lora_cfg.r, lora_dropout=lora_cfg.lora_dropout > 0,
        micro_batch=batching.micro, context=t.context_length, shard=shard, fsdp=t.enable_fsdp,
        reshard=parallel.reshards_after_forward(f), ddp=world > 1 and not t.enable_fsdp,
        checkpointing=checkpointing, offload=f.fsdp_cpu_offload,
        deferred_reduce=t.enable_fsdp and t.use_peft and batching.accum > 1,  # loop._grad_sync
        optimizer_bytes=(8 + (2 if f.pure_bf16 else 0)) if anyprecision else 2 * storage,
        quant_bytes={"8bit": 1.0, "4bit": 0.5 + 4 / 64}.get(t.quantization),  # nf4 + an fp32 absmax per 64
    )


def adapter_params(cfgs: Configs, shape: ModelShape) -> int:
    """What the PEFT method trains, counted by the method's own module."""
    from .. import adapters

    t = cfgs.train
    return adapters.code(t.peft_method).trainable_params(cfgs.peft_config, shape) if t.use_peft else 0


def layer_activation_bytes(shape: ModelShape, s: Setup) -> int:
    """Bytes autograd saves per token in one decoder layer (transformers' LlamaDecoderLayer
    with SDPA, which keeps no seq x seq matrix): each op saves only what its backward needs,
    so a frozen linear saves nothing of its input."""
    h, i, c = shape.hidden, shape.intermediate, s.compute

    def rmsnorm(trained: bool) -> int:
        # upcast input (fp32) for pow and the normalise-mul; the normalised value only
        # when the norm's weight trains
        return 4 * h + (c * h if trained else 0)

    def linear_inputs(names: tuple[str, ...], width: int) -> int:
        """Inputs saved by the linears that read one tensor of `width` features."""
        saved = 0
        if s.trainable_linears & set(names):
            saved += c * width  # one shared tensor
        for name in names:
            if name in s.lora_linears:
                # lora_A saves its input: a dropout copy (+ a 1-byte mask) per adapter, or the shared tensor
                saved += (c * width + width) if s.lora_dropout else (0 if saved else c * width)
                saved += c * s.lora_rank  # lora_A's output, saved by lora_B
        return saved

    full = bool(s.trainable_linears)
    attention = (linear_inputs(("q_proj", "k_proj", "v_proj"), h)
                 + c * (2 * shape.q_dim + 2 * shape.kv_dim)  # SDPA: q, k (after RoPE), v, output
                 + linear_inputs(("o_proj",), shape.q_dim))
    mlp = (linear_inputs(("gate_proj", "up_proj"), h)
           + 3 * c * i  # SiLU's input, and both operands of gate * up
           + linear_inputs(("down_proj",), i))
    return rmsnorm(full) + attention + rmsnorm(full) + mlp


def plan_memory(cfgs: Configs, shape: ModelShape, launch: Launch) -> MemoryPlan:
    s = resolve_setup(cfgs, launch)
    tokens = s.micro_batch * s.context
    full_ft = bool(s.trainable_linears)
    n_adapter = adapter_params(cfgs, shape)
    trainable = shape.params() if full_ft else n_adapter

    # parameters: sharded storage (trained weights in the storage dtype, frozen ones in
    # Precision.frozen) + what FSDP gathers in the compute dtype while it runs
    base = shape.params()
    base_bytes = s.storage if full_ft else s.frozen
    if s.quant_bytes is not None:
        quantized = shape.layers * sum(a * b for a, b in shape.linears().values())
        stored = int(quantized * s.quant_bytes) + (base - quantized) * base_bytes
    else:
        stored = base * base_bytes
    stored = stored // s.shard + n_adapter * s.storage // s.shard
    gathered = 0
    if s.fsdp:
        live_layers = 2 if s.reshard else shape.layers  # the running layer and the prefetched next
        gathered = (shape.root_params() + live_layers * shape.layer_params()) * s.compute
    elif s.compute != base_bytes:
        gathered = base * s.compute  # autocast's cache of low-precision copies of fp32 weights

    # gradients: sharded (in the storage dtype), but an adapter's stay unsharded across
    # accumulating micro-batches; FSDP also holds the root's unsharded ones until backward
    # ends, and DDP its buckets (a second copy)
    grads = trainable * s.storage // (1 if s.deferred_reduce else s.shard)
    if s.ddp:
        grads *= 2
    root_grad = shape.root_params() * 4 if (full_ft and s.fsdp) else 0
    head_grad = shape.vocab * shape.hidden * 4 if full_ft else 0

    optimizer = trainable * s.optimizer_bytes // s.shard

    # activations at the start of backward
    layer = layer_activation_bytes(shape, s)
    if s.checkpointing:
        per_token = shape.layers * s.compute * shape.hidden + layer
    else:
        per_token = shape.layers * layer
    per_token += 4 * shape.hidden + s.compute * shape.hidden  # final norm, the head's input
    # logits, their fp32 log-softmax and its gradient, for one checkpointed chunk of the
    # labelled positions (loss.py); the labelled share is the data's, so bound it by tokens
    loss = 12 * shape.vocab * min(math.ceil(tokens * launch.label_share), CE_CHUNK_TOKENS)
    activations = tokens * per_token + loss

    overhead = launch.overhead if launch.overhead is not None else default_overhead(launch.device)
    host = 0
    if s.offload:  # FSDP2's CPUOffloadPolicy keeps shards, gradients and optimizer state on the host
        host = stored + grads + optimizer
        if launch.device != "cpu":
            stored, grads, optimizer = 0, 0, 0
    parameters = stored + gathered
    gradients = grads + root_grad
    train_peak = max(activations + head_grad, gradients)
    peak = parameters + optimizer + train_peak + overhead
    return MemoryPlan(parameters, gradients, optimizer, activations, overhead, peak, host)


CUDA_OVERHEAD = 1 * GiB


def default_overhead(device: str) -> int:
    return CUDA_OVERHEAD if device != "cpu" else measured_cpu_baseline()


_BASELINE_PROBE = """
import torch, torch.distributed.fsdp, transformers, peft
from transformers.models.llama import modeling_llama
import shardtune.recipes.sft
for line in open('/proc/self/status'):
    if line.startswith('VmHWM:'):
        print(int(line.split()[1]) * 1024)
"""


def measured_cpu_baseline() -> int:
    """Peak resident memory of a fresh process that imported what a rank imports."""
    out = subprocess.run([sys.executable, "-c", _BASELINE_PROBE], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise UserError("could not measure this machine's process baseline; pass --overhead SIZE")
    return int(out.stdout.split()[-1])


# ---- what to change when it does not fit ----------------------------------------------

@dataclass(frozen=True)
class Change:
    """One change to the run: finetune flags to append and/or another launch."""

    label: str
    flags: list[str]
    launch: Launch


def suggestions(argv: list[str], shape: ModelShape, launch: Launch, budget: int) -> list[tuple[Change, MemoryPlan]]:
    """Single changes, cheapest first (compute, then throughput, then hardware, then
    numerics), each with its plan. The caller takes the first that fits."""
    cfgs = parse_args(argv)
    t, f = cfgs.train, cfgs.fsdp
    from ..config.validate import resolve_batching

    candidates: list[Change] = []
    if t.enable_fsdp and not f.fsdp_activation_checkpointing:
        candidates.append(Change("--fsdp_activation_checkpointing True", ["--fsdp_activation_checkpointing", "True"], launch))
    batching = resolve_batching(cfgs)
    micro = batching.micro // 2
    while micro >= 1:  # keep the global batch: more accumulation
        per_rank = batching.micro * batching.accum
        if per_rank % micro == 0:
            flags = ["--batch_size_training", str(per_rank), "--micro_batch_size", str(micro),
                     "--gradient_accumulation_steps", "1"]
            candidates.append(Change(f"--micro_batch_size {micro} (accumulation {per_rank // micro}, same global batch)",
                               flags, launch))
        micro //= 2
    if t.enable_fsdp:
        ranks_per_node = launch.world_size // launch.nnodes
        for nodes in (2, 4, 8, 16, 32, 64):
            bigger = replace(launch, world_size=ranks_per_node * launch.nnodes * nodes, nnodes=launch.nnodes * nodes)
            candidates.append(Change(f"--world_size {bigger.world_size} ({bigger.nnodes} nodes)", [], bigger))
        if not f.fsdp_cpu_offload and launch.device != "cpu":
            candidates.append(Change("--fsdp_cpu_offload True", ["--fsdp_cpu_offload", "True"], launch))
    elif t.use_peft and launch.world_size == 1 and not t.quantization:
        for bits in ("8bit", "4bit"):
            candidates.append(Change(f"--quantization {bits}", ["--quantization", bits], launch))
    for change in candidates:
        try:
            new_plan = plan_memory(parse_args(argv + change.flags), shape, change.launch)
        except UserError:
            continue  # a change this configuration does not allow
        if new_plan.peak <= budget:
            return [(change, new_plan)]
    return []


# ---- command line ---------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'80GiB', '80GB' (10^9), '80G' (= GiB), '512MiB' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--device_memory {text!r}: write a size such as 80GiB, 80GB or 24G")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    if unit.endswith("B") and not unit.endswith("IB") and len(unit) == 2:
        return int(number * 1000 ** "BKMGT".index(unit[0]))  # decimal GB, MB, ...
    return int(number * _UNITS[unit[:1]])


def launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardtune plan", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Predict peak memory per rank of `shardtune finetune FLAGS` before launching it.",
        epilog=EXAMPLE.format(names=", ".join(KNOWN_MODELS)))
    p.add_argument("--world_size", type=int, default=1, help="ranks in all (default 1)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (HYBRID_SHARD shards within one; default 1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: accelerator memory; cpu: host RAM per rank (peak RSS)")
    p.add_argument("--device_memory", help="memory per rank, e.g. 80GiB; says whether it fits and what would")
    p.add_argument("--overhead", help="runtime overhead per rank instead of the default (cuda 1GiB; cpu measured)")
    p.add_argument("--label_share", default="1.0",
                   help="share of positions with labels, which alone reach the output head: a number, or auto "
                        "to count it in the training split (tokenizes the data; default 1.0, the upper bound)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def measured_label_share(cfgs: Configs) -> float:
    """Labelled positions / all positions of the packed (or padded) training split."""
    from .. import data
    from ..data.tokenize import IGNORE_INDEX
    from ..modeling.load import load_tokenizer, resolve_model_dir

    t = cfgs.train
    tokenizer = load_tokenizer(t.tokenizer_name or str(resolve_model_dir(t.model_name)))
    split = data.build_split(cfgs, tokenizer, "train")
    labelled = positions = 0
    for index in range(len(split.dataset)):
        labels = split.dataset[index]["labels"]
        labelled += int((labels != IGNORE_INDEX).sum())
        positions += labels.numel()
    return labelled / max(positions, 1)


def label_share(text: str, cfgs: Configs) -> float:
    if text == "auto":
        return measured_label_share(cfgs)
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise UserError(f"--label_share {text!r}: give a share in (0, 1], or auto")
    return share


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def report(shape: ModelShape, plan: MemoryPlan, launch: Launch, budget: int | None,
           fix: list[tuple[Change, MemoryPlan]]) -> str:
    lines = [f"model: {shape.params() / 1e9:.3f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"vocab {shape.vocab}); {launch.world_size} ranks on {launch.nnodes} node(s), {launch.device}",
             "predicted peak memory per rank:"]
    for name in ("parameters", "gradients", "optimizer", "activations", "overhead"):
        lines.append(f"  {name:<12}{_gib(getattr(plan, name))}")
    lines.append(f"  {'peak':<12}{_gib(plan.peak)}   (params + optimizer + max(activations, gradients) + overhead)")
    if plan.host:
        lines.append(f"  host (CPU offload) {_gib(plan.host)} per rank")
    if budget is not None:
        verdict = "fits" if plan.peak <= budget else "does NOT fit"
        lines.append(f"{verdict} in --device_memory {budget / GiB:.2f} GiB")
        if plan.peak > budget:
            lines.append(f"cheapest change that fits: {fix[0][0].label} -> peak {fix[0][1].peak / GiB:.2f} GiB"
                         if fix else "no single change fits; combine them or use more memory per rank")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = launch_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    launch_args, finetune_argv = parser.parse_known_args(argv)
    cfgs = parse_args(finetune_argv)
    overhead = parse_size(launch_args.overhead) if launch_args.overhead else None
    launch = Launch(launch_args.world_size, launch_args.nnodes, launch_args.device, overhead,
                    label_share(launch_args.label_share, cfgs))
    if overhead is None:
        launch = replace(launch, overhead=default_overhead(launch.device))  # measured once for all variants
    shape = model_shape(cfgs.train.model_name)
    check_nf4_shards(cfgs, shape, launch)
    plan = plan_memory(cfgs, shape, launch)
    budget = parse_size(launch_args.device_memory) if launch_args.device_memory else None
    fix = suggestions(finetune_argv, shape, launch, budget) if budget is not None and plan.peak > budget else []
    if launch_args.json:
        print(json.dumps({"model": {**asdict(shape), "params": shape.params()}, "launch": asdict(launch),
                          "plan": plan.as_dict(), "device_memory": budget,
                          "fits": None if budget is None else plan.peak <= budget,
                          "suggestion": {**asdict(fix[0][0]), "plan": fix[0][1].as_dict()} if fix else None}))
    else:
        print(report(shape, plan, launch, budget, fix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
