"""Config dataclasses with llama-recipes' names and defaults, and what each field means.

Class names are lower-case on purpose: they are the names users type in
qualified flags (`--lora_config.r 16`) and know from llama-recipes. Each field's meaning
lives in its metadata: `--help` prints it, and tests/unit/test_readme.py checks that README.md's
config tables list every field with its default.
"""
from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Optional


def flag(default: Any, help: str) -> Any:
    """A config field: its default and what it means (shown by --help)."""
    return field(default=default, metadata={"help": help})


def help_text(cls: type, f: Field) -> str:
    """What a field means; a field whose values are a registry's names lists them."""
    choices = CHOICES.get((cls.__name__, f.name))
    return f.metadata["help"] + (f" ({' | '.join(choices)})" if choices else "")


@dataclass
class train_config:
    model_name: str = flag(
        "PATH/to/LLAMA/7B", "Hugging Face model directory (config.json, *.safetensors, tokenizer) or hub id")
    tokenizer_name: Optional[str] = flag(None, "tokenizer directory; defaults to model_name")
    enable_fsdp: bool = flag(False, "shard with FSDP2 (needs torchrun)")
    run_validation: bool = flag(True, "evaluate after every epoch")
    batch_size_training: int = flag(4, "per-rank batch per optimizer step")
    # Seed semantics: per-forward batch per rank; accumulation is
    # batch_size_training / micro_batch_size. Follows batch_size_training when not set.
    micro_batch_size: int = flag(
        4, "per-rank batch per forward; accumulation = batch_size_training / micro_batch_size")
    gradient_accumulation_steps: int = flag(
        1, "micro-batches of batch_size_training per optimizer step (instead of micro_batch_size)")
    gradient_clipping: bool = flag(False, "clip the global gradient norm across shards")
    gradient_clipping_threshold: float = flag(1.0, "max gradient norm when clipping (> 0)")
    num_epochs: int = flag(3, "epochs (>= 1)")
    max_train_step: int = flag(0, "stop after this many optimizer steps in the run (0 = no limit)")
    max_eval_step: int = flag(0, "eval batches per evaluation (0 = all)")
    # 0: batches are pre-tokenized, so collating costs microseconds and a worker's start costs seconds
    num_workers_dataloader: int = flag(0, "DataLoader worker processes per rank (0 = load in the training process)")
    lr: float = flag(1e-4, "AdamW learning rate (the peak of a warmup schedule)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    gamma: float = flag(0.85, "StepLR decay per epoch (lr_scheduler step)")
    lr_scheduler: str = flag(
        "step", "step (lr x gamma per epoch) | cosine | linear | constant (warmup, then per optimizer step)")
    warmup_steps: int = flag(0, "optimizer steps of linear warmup for cosine, linear and constant")
    seed: int = flag(42, "seeds adapter init and the data order")
    use_fp16: bool = flag(False, "fp16 compute with fp32 master weights and a gradient scaler")
    mixed_precision: bool = flag(True, "bf16 compute with fp32 master weights (default on devices with fast bf16)")
    val_batch_size: int = flag(1, "per-rank eval batch (>= 1)")
    dataset: str = flag("samsum_dataset", "the dataset config to train on")
    batching_strategy: str = flag(
        "packing", "packing (examples concatenated, attention isolated) | padding (one example per row)")
    context_length: int = flag(4096, "chunk (or row) length in tokens; longer examples are truncated")
    drop_last: bool = flag(False, "packing: drop the last, partly filled chunk of each split")
    on_bad_record: str = flag(
        "error", "error (stop, naming the file and record) | skip (leave bad records out, count them)")
    data_cache_dir: str = flag(
        "", 'tokenization cache directory ("" = $SHARDTUNE_CACHE or ~/.cache/shardtune; none = off)')
    peft_method: str = flag("lora", "the PEFT method, with use_peft")
    use_peft: bool = flag(False, "train a PEFT adapter; without it, full fine-tuning")
    from_peft_checkpoint: str = flag("", "start from this saved adapter directory instead of a fresh init")
    output_dir: str = flag("PATH/to/save/PEFT/model", "where the adapter or fine-tuned model, and metrics.jsonl, go")
    freeze_layers: bool = flag(False, "freeze the first num_freeze_layers decoder layers (full fine-tuning only)")
    num_freeze_layers: int = flag(1, "decoder layers frozen by freeze_layers (>= 0)")
    quantization: Optional[str] = flag(
        None,
        "8bit | 4bit (QLoRA) base weights, with use_peft: bitsandbytes in one process; 4bit + enable_fsdp: torchao "
        "NF4 shards")
    one_gpu: bool = flag(False, "llama-recipes' single-GPU switch; contradicts enable_fsdp")
    save_model: bool = flag(True, "write the final adapter / model, and a step checkpoint at each epoch end")
    dist_checkpoint_root_folder: str = flag(
        "PATH/to/save/FSDP/model",
        "step checkpoints go to ROOT/FOLDER-MODELNAME (default ROOT: "
        "output_dir/checkpoints)")
    dist_checkpoint_folder: str = flag("fine-tuned", "FOLDER of the step checkpoints' directory")
    save_optimizer: bool = flag(False, "accepted for llama-recipes; step checkpoints always hold the optimizer")
    save_steps: int = flag(0, "also a step checkpoint every N optimizer steps (0 = only at epoch ends)")
    save_total_limit: int = flag(2, "newest step checkpoints kept, plus best/ (0 = keep all)")
    async_checkpoint: bool = flag(
        True, "step checkpoints stall training only to copy their tensors to host memory, then write in the "
        "background (False: write before training continues, without the host copy)")
    resume: str = flag("", "auto (newest complete checkpoint, or a fresh start) | a step_NNNNNN or best path")
    resume_with_changes: bool = flag(
        False, "resume although the data, mixture, seed, context length, batching or dpo_config differ from the "
        "checkpoint's (its data position then points into other data)")
    overwrite_output_dir: bool = flag(False, "replace a previous run's outputs and checkpoints instead of refusing")
    save_metrics: bool = flag(False, "append per-step and per-epoch JSON lines to output_dir/metrics.jsonl")
    dist_timeout: int = flag(1800, "seconds a collective may wait for a peer before the run fails")
    log_every: int = flag(10, "optimizer steps between loss updates of the progress bar and metrics")
    eval_steps: int = flag(0, "with run_validation: also evaluate every N optimizer steps (0 = epoch ends only)")
    use_tensorboard: bool = flag(
        False, "rank 0 writes TensorBoard scalars (loss, ppl, lr, tokens/s, grad norm, memory)")
    tensorboard_dir: str = flag("", 'TensorBoard directory ("" = output_dir/tensorboard)')
    use_wandb: bool = flag(
        False, "rank 0 logs the same scalars to Weights & Biases (wandb_config; WANDB_MODE=offline works)")
    peak_tflops: float = flag(0.0, "per-device peak TFLOP/s for MFU (0 = detect known GPUs; CPU: no MFU unless set)")
    compile: bool = flag(
        False, "torch.compile each decoder layer before sharding (inductor; the first steps pay the compile)")


@dataclass
class fsdp_config:
    mixed_precision: bool = flag(True, "see train_config.mixed_precision")
    use_fp16: bool = flag(False, "see train_config.use_fp16")
    sharding_strategy: str = flag("FULL_SHARD", "FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD")
    hsdp: bool = flag(False, "same as sharding_strategy HYBRID_SHARD")
    sharding_group_size: int = flag(0, "HSDP shard group size (0 = ranks per node)")
    replica_group_size: int = flag(0, "HSDP replicas (0 = world / sharding_group_size)")
    checkpoint_type: str = flag(
        "SHARDED_STATE_DICT", "SHARDED_STATE_DICT (step checkpoints: DCP shards) | FULL_STATE_DICT (each step "
        "checkpoint also holds hf/, the adapter or model for from_pretrained)")
    fsdp_activation_checkpointing: bool = flag(True, "activation checkpointing of every decoder layer")
    fsdp_cpu_offload: bool = flag(False, "sharded parameters, gradients and optimizer state in host memory")
    pure_bf16: bool = flag(False, "weights and gradients in bf16 (pair with optimizer anyprecision)")
    optimizer: str = flag("AdamW", "AdamW | anyprecision (AnyPrecisionAdamW with Kahan summation)")


@dataclass
class lora_config:
    r: int = flag(8, "LoRA rank (>= 1)")
    lora_alpha: int = flag(32, "LoRA scaling numerator (scale = lora_alpha / r)")
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "comma-separated module names, or "
                          "all-linear"})
    bias: str = flag("none", "none | all | lora_only (peft's bias training)")
    task_type: str = flag("CAUSAL_LM", "peft task type")
    lora_dropout: float = flag(0.05, "dropout on the LoRA input, in [0, 1)")
    inference_mode: bool = flag(False, "peft's inference mode (adapter frozen)")
    use_dora: bool = flag(
        False, "DoRA: a trained magnitude per output row on top of LoRA (computed from the loaded base)")


@dataclass
class llama_adapter_config:
    adapter_len: int = flag(10, "adaption prompt length")
    adapter_layers: int = flag(30, "top decoder layers with an adaption prompt (capped at the model's depth)")
    task_type: str = flag("CAUSAL_LM", "peft task type")


@dataclass
class prefix_config:
    num_virtual_tokens: int = flag(30, "prefix length")
    task_type: str = flag("CAUSAL_LM", "peft task type")


@dataclass
class samsum_dataset:
    dataset: str = flag("samsum_dataset", "the config's name")
    # "sample" = the small sample bundled with shardtune; otherwise a directory of
    # train/val/test files (or train/val/test directories of shards), a single file, or a hub id (online only).
    data_path: str = flag("sample", "sample (bundled) | a directory of train/val/test files or shard directories | "
                                    "one file | a hub id")
    train_split: str = flag("train", "split used for training")
    test_split: str = flag("validation", "split used for validation")
    input_length: int = flag(2048, "kept for compatibility; context_length governs truncation")


@dataclass
class grammar_dataset:
    dataset: str = flag("grammar_dataset", "the config's name")
    train_split: str = flag(
        "ft_datasets/grammar_dataset/gtrain_10k.csv",
        "training CSV (input,target), e.g. from `shardtune prepare "
        "grammar`")
    test_split: str = flag("ft_datasets/grammar_dataset/grammar_validation.csv", "validation CSV")
    input_length: int = flag(2048, "kept for compatibility; context_length governs truncation")


@dataclass
class alpaca_dataset:
    dataset: str = flag("alpaca_dataset", "the config's name")
    train_split: str = flag("train", "train: all records after the first 5%")
    test_split: str = flag("val", "val: the first 5% of the records")
    data_path: str = flag("ft_datasets/alpaca_data.json",
                          "Stanford Alpaca's alpaca_data.json (.jsonl, .parquet, .arrow or a directory of shards work too)")


@dataclass
class custom_dataset:
    dataset: str = flag("custom_dataset", "the config's name")
    file: str = flag(
        "examples/custom_dataset.py", "path/to/file.py[:function] defining get_custom_dataset (run as Python code)")
    train_split: str = flag("train", "passed to your function as split for training")
    test_split: str = flag("validation", "passed to your function as split for validation")


@dataclass
class chat_dataset:
    dataset: str = flag("chat_dataset", "the config's name")
    data_path: str = flag(
        "", '.jsonl, .json, .parquet or .arrow of {"messages": [...]} or ShareGPT {"conversations": [...]} records, '
            'or a directory of such shards')
    validation_path: str = flag("", 'a separate validation file ("" = the first 5% of data_path)')
    template: str = flag("tokenizer", "tokenizer (its own chat template) | llama3 | llama2 | chatml")
    train_on_input: bool = flag(False, "also train the system and user turns (default: assistant turns only)")
    system_prompt: str = flag("", "system turn for conversations that have none")
    train_split: str = flag("train", "train: data_path after the first 5% (all of it with validation_path)")
    test_split: str = flag("validation", "validation: the first 5% of data_path, or validation_path")


@dataclass
class preference_dataset:
    dataset: str = flag("preference_dataset", "the config's name")
    data_path: str = flag(
        "", '.jsonl, .json, .parquet or .arrow of preference records {"prompt", "chosen", "rejected"} (TRL\'s layouts), '
            'or a directory of such shards')
    validation_path: str = flag("", 'a separate validation file ("" = the first 5% of data_path)')
    template: str = flag("tokenizer", "conversational records: tokenizer (its own chat template) | llama3 | llama2 | chatml")
    system_prompt: str = flag("", "system turn for conversational prompts that have none")
    train_split: str = flag("train", "train: data_path after the first 5% (all of it with validation_path)")
    test_split: str = flag("validation", "validation: the first 5% of data_path, or validation_path")


@dataclass
class mixture_dataset:
    dataset: str = flag("mixture_dataset", "the config's name")
    datasets: str = flag(
        "", 'weighted components, "chat_dataset:0.6,alpaca_dataset:0.4"; each reads its own config group')


@dataclass
class dpo_config:
    """The dpo recipe's own flags (shardtune dpo); TRL's names and defaults."""

    loss_type: str = flag("sigmoid", "sigmoid (DPO) | cdpo (conservative DPO, with label_smoothing) | ipo | simpo "
                          "(reference-free) | orpo (reference-free, + NLL of the chosen prompt and response)")
    beta: float = flag(0.1, "how far the policy may move from the reference (IPO's tau; SimPO's beta) (> 0)")
    label_smoothing: float = flag(
        0.0, "cdpo and simpo: probability that a preference is flipped (TRL's sigmoid has none), in [0, 0.5)")
    simpo_gamma: float = flag(0.5, "simpo: target reward margin (>= 0)")
    orpo_alpha: float = flag(0.1, "orpo: weight of the odds-ratio term against the NLL (TRL's ORPO beta) (> 0)")
    truncation_mode: str = flag(
        "keep_start", "a pair longer than --context_length: keep_start (TRL's: each completion cut to what the "
        "prompt leaves; a pair whose prompt fills the context is dropped) | refuse (a bad record: --on_bad_record)")
    reference: str = flag(
        "base", "base (adapter disabled, or with --from_peft_checkpoint the starting adapter; full fine-tuning: a frozen "
        "sharded copy) | precomputed (the reference log probabilities computed once before training, cached) | a model "
        "directory (a frozen sharded copy of it)")
    disable_dropout: bool = flag(True, "set every dropout (LoRA's lora_dropout too) to 0 in the policy, as TRL")


@dataclass
class wandb_config:
    """llama-recipes' configs/wandb.py, plus the run name: wandb.init's arguments."""

    project: str = flag("llama_recipes", "wandb project")
    entity: Optional[str] = flag(None, "team or user (None: wandb's default)")
    name: Optional[str] = flag(None, "run name (None: wandb picks one)")
    job_type: Optional[str] = flag(None, "as in wandb.init")
    tags: Optional[list[str]] = flag(None, "comma-separated tags")
    group: Optional[str] = flag(None, "as in wandb.init")
    notes: Optional[str] = flag(None, "as in wandb.init")
    mode: Optional[str] = flag(None, "online | offline | disabled (None: WANDB_MODE, else online)")


# ---- registries: each PEFT method and each dataset is declared here, once ---------------

@dataclass(frozen=True)
class PeftMethod:
    """A PEFT method (--peft_method NAME). Its code is the module shardtune.adapters.NAME,
    imported when a run uses it: peft_config, check, init_weights, saved_key and
    trainable_params, and where the method needs them adapter_state and init_from_base
    (adapters/__init__.py says what each does). tests/unit/test_registries.py fails when an entry
    lacks its module, a function, its help text, its planner count or its README row."""

    config: type  # its flags: --<config name>.<field>
    packs: bool = True  # several examples may share a row
    activation_checkpointing: bool = True  # a checkpointed layer may be replayed


PEFT_METHODS = {
    "lora": PeftMethod(lora_config),
    "llama_adapter": PeftMethod(llama_adapter_config),
    # The learned prefix is a KV cache: transformers then stops isolating packed examples,
    # and each layer appends to it, so an activation-checkpoint replay would append twice.
    "prefix": PeftMethod(prefix_config, packs=False, activation_checkpointing=False),
}


@dataclass(frozen=True)
class DatasetKind:
    """A dataset (--dataset NAME, NAME being its config's name). Its reader is
    shardtune.data.MODULE.source(config, split) -> data.source.Source."""

    config: type
    module: str
    generation_metric: Optional[str] = None  # what `shardtune eval` scores generations with
    pairs: bool = False  # preference pairs: trained by the dpo recipe, not by finetune


DATASETS = {kind.config.__name__: kind for kind in (
    DatasetKind(samsum_dataset, "samsum", generation_metric="rouge"),
    DatasetKind(grammar_dataset, "grammar", generation_metric="gleu"),
    DatasetKind(alpaca_dataset, "alpaca"),
    DatasetKind(custom_dataset, "custom"),
    DatasetKind(chat_dataset, "chat"),
    DatasetKind(preference_dataset, "preference", pairs=True),
    DatasetKind(mixture_dataset, "mixture"),
)}

ALL_CONFIGS = (train_config, fsdp_config, *(m.config for m in PEFT_METHODS.values()),
               *(d.config for d in DATASETS.values()), wandb_config, dpo_config)

# fields whose valid values are a registry's names: --help lists them from it
CHOICES = {("train_config", "peft_method"): PEFT_METHODS, ("train_config", "dataset"): DATASETS}


@dataclass
class Configs:
    """Every config of one run, plus which fields the user set explicitly."""

    train: train_config
    fsdp: fsdp_config
    peft: dict  # config class name -> instance
    datasets: dict  # dataset name -> instance
    explicit: set = field(default_factory=set)  # "config_name.field" set by YAML or CLI
    wandb: wandb_config = field(default_factory=wandb_config)
    dpo: dpo_config = field(default_factory=dpo_config)

    def all(self) -> list:
        return [self.train, self.fsdp, *self.peft.values(), *self.datasets.values(), self.wandb, self.dpo]

    def was_set(self, config, name: str) -> bool:
        return f"{type(config).__name__}.{name}" in self.explicit

    @property
    def dataset(self):
        return self.datasets[self.train.dataset]

    @property
    def peft_config(self):
        return self.peft[PEFT_METHODS[self.train.peft_method].config.__name__]


def default_configs() -> Configs:
    return Configs(
        train=train_config(),
        fsdp=fsdp_config(),
        peft={m.config.__name__: m.config() for m in PEFT_METHODS.values()},
        datasets={name: kind.config() for name, kind in DATASETS.items()},
    )


def field_names(config_cls) -> list[str]:
    return [f.name for f in fields(config_cls)]
