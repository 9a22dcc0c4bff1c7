"""Config dataclasses with llama-recipes' names and defaults.

Class names are lower-case on purpose: they are the names users type in
qualified flags (`--lora_config.r 16`) and know from llama-recipes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class train_config:
    model_name: str = "PATH/to/LLAMA/7B"
    tokenizer_name: Optional[str] = None
    enable_fsdp: bool = False
    run_validation: bool = True
    batch_size_training: int = 4
    # Seed semantics: per-forward batch per rank; accumulation is
    # batch_size_training / micro_batch_size. Follows batch_size_training when not set.
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    gradient_clipping: bool = False
    gradient_clipping_threshold: float = 1.0
    num_epochs: int = 3
    max_train_step: int = 0  # optimizer steps per run; 0 = no limit
    max_eval_step: int = 0  # eval batches per evaluation; 0 = no limit
    # 0: batches are pre-tokenized, so collating costs microseconds and a worker's start costs seconds
    num_workers_dataloader: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    gamma: float = 0.85  # StepLR's per-epoch decay (lr_scheduler step)
    lr_scheduler: str = "step"  # step (per epoch) | cosine | linear | constant (per optimizer step)
    warmup_steps: int = 0  # linear warmup steps of cosine, linear and constant
    seed: int = 42
    use_fp16: bool = False
    mixed_precision: bool = True
    val_batch_size: int = 1
    dataset: str = "samsum_dataset"
    batching_strategy: str = "packing"  # packing | padding
    context_length: int = 4096
    drop_last: bool = False  # drop the last, partly filled packed chunk of each split
    on_bad_record: str = "error"  # error | skip
    data_cache_dir: str = ""  # tokenization cache; "" = $SHARDTUNE_CACHE or ~/.cache/shardtune
    peft_method: str = "lora"  # lora | llama_adapter | prefix
    use_peft: bool = False
    from_peft_checkpoint: str = ""  # start from this adapter instead of a fresh init
    output_dir: str = "PATH/to/save/PEFT/model"
    freeze_layers: bool = False
    num_freeze_layers: int = 1
    quantization: Optional[str] = None  # 8bit | 4bit (a bare --quantization means 8bit)
    one_gpu: bool = False
    save_model: bool = True
    dist_checkpoint_root_folder: str = "PATH/to/save/FSDP/model"
    dist_checkpoint_folder: str = "fine-tuned"
    save_optimizer: bool = False  # kept for llama-recipes; step checkpoints always hold the optimizer
    save_steps: int = 0  # a step checkpoint every N optimizer steps; 0 = only at epoch ends
    save_total_limit: int = 2  # newest step checkpoints kept (plus best/); 0 = keep all
    resume: str = ""  # auto = newest complete checkpoint (or a fresh start); or a step_NNNNNN path
    overwrite_output_dir: bool = False  # replace a previous run's outputs and checkpoints
    save_metrics: bool = False
    dist_timeout: int = 1800  # seconds a collective may wait for a peer before the run fails
    log_every: int = 10  # optimizer steps between progress-bar loss updates
    eval_steps: int = 0  # with run_validation: also evaluate every N optimizer steps; 0 = epoch ends only
    use_tensorboard: bool = False  # rank 0 writes TensorBoard scalars
    tensorboard_dir: str = ""  # "" = output_dir/tensorboard
    use_wandb: bool = False  # rank 0 logs to Weights & Biases (wandb_config; WANDB_MODE=offline works)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = detect known GPUs
    compile: bool = False  # torch.compile each decoder layer (before fully_shard)


@dataclass
class fsdp_config:
    mixed_precision: bool = True
    use_fp16: bool = False
    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD
    hsdp: bool = False
    sharding_group_size: int = 0  # HSDP shard-group size; 0 = ranks per node
    replica_group_size: int = 0  # HSDP replica count; 0 = world / sharding_group_size
    checkpoint_type: str = "SHARDED_STATE_DICT"  # SHARDED_STATE_DICT | FULL_STATE_DICT
    fsdp_activation_checkpointing: bool = True
    fsdp_cpu_offload: bool = False
    pure_bf16: bool = False
    optimizer: str = "AdamW"  # AdamW | anyprecision


@dataclass
class lora_config:
    r: int = 8
    lora_alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    task_type: str = "CAUSAL_LM"
    lora_dropout: float = 0.05
    inference_mode: bool = False
    use_dora: bool = False  # DoRA: a trained magnitude per output row on top of LoRA


@dataclass
class llama_adapter_config:
    adapter_len: int = 10
    adapter_layers: int = 30
    task_type: str = "CAUSAL_LM"


@dataclass
class prefix_config:
    num_virtual_tokens: int = 30
    task_type: str = "CAUSAL_LM"


@dataclass
class samsum_dataset:
    dataset: str = "samsum_dataset"
    # "sample" = the small sample bundled with shardtune; otherwise a directory of
    # train/val/test files, a single file, or a hub id (online only).
    data_path: str = "sample"
    train_split: str = "train"
    test_split: str = "validation"
    input_length: int = 2048


@dataclass
class grammar_dataset:
    dataset: str = "grammar_dataset"
    train_split: str = "ft_datasets/grammar_dataset/gtrain_10k.csv"
    test_split: str = "ft_datasets/grammar_dataset/grammar_validation.csv"
    input_length: int = 2048


@dataclass
class alpaca_dataset:
    dataset: str = "alpaca_dataset"
    train_split: str = "train"
    test_split: str = "val"
    data_path: str = "ft_datasets/alpaca_data.json"


@dataclass
class custom_dataset:
    dataset: str = "custom_dataset"
    file: str = "examples/custom_dataset.py"
    train_split: str = "train"
    test_split: str = "validation"


@dataclass
class chat_dataset:
    dataset: str = "chat_dataset"
    data_path: str = ""  # .jsonl, .json or .parquet of {"messages": [...]} or ShareGPT {"conversations": [...]}
    validation_path: str = ""  # "" = validation is the first 5% of data_path, training the rest
    template: str = "tokenizer"  # tokenizer (its own chat template) | llama3 | llama2 | chatml
    train_on_input: bool = False  # False: train only the assistant turns
    system_prompt: str = ""  # prepended as the system turn where a conversation has none
    train_split: str = "train"
    test_split: str = "validation"


@dataclass
class wandb_config:
    """llama-recipes' configs/wandb.py, plus the run name: wandb.init's arguments."""

    project: str = "llama_recipes"
    entity: Optional[str] = None
    name: Optional[str] = None
    job_type: Optional[str] = None
    tags: Optional[list[str]] = None
    group: Optional[str] = None
    notes: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; None = WANDB_MODE or online


DATASET_CONFIGS = (samsum_dataset, grammar_dataset, alpaca_dataset, custom_dataset, chat_dataset)
PEFT_CONFIGS = {"lora": lora_config, "llama_adapter": llama_adapter_config, "prefix": prefix_config}
ALL_CONFIGS = (train_config, fsdp_config, lora_config, llama_adapter_config, prefix_config, *DATASET_CONFIGS,
               wandb_config)


@dataclass
class Configs:
    """Every config of one run, plus which fields the user set explicitly."""

    train: train_config
    fsdp: fsdp_config
    peft: dict  # config class name -> instance
    datasets: dict  # dataset name -> instance
    explicit: set = field(default_factory=set)  # "config_name.field" set by YAML or CLI
    wandb: wandb_config = field(default_factory=wandb_config)

    def all(self) -> list:
        return [self.train, self.fsdp, *self.peft.values(), *self.datasets.values(), self.wandb]

    def was_set(self, config, name: str) -> bool:
        return f"{type(config).__name__}.{name}" in self.explicit

    @property
    def dataset(self):
        return self.datasets[self.train.dataset]

    @property
    def peft_config(self):
        return self.peft[PEFT_CONFIGS[self.train.peft_method].__name__]


def default_configs() -> Configs:
    return Configs(
        train=train_config(),
        fsdp=fsdp_config(),
        peft={c.__name__: c() for c in PEFT_CONFIGS.values()},
        datasets={c.__name__: c() for c in DATASET_CONFIGS},
    )


def field_names(config_cls) -> list[str]:
    return [f.name for f in fields(config_cls)]
