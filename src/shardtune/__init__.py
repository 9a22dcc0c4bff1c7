"""shardtune: fine-tune Llama-architecture models with PEFT and PyTorch FSDP2."""

__version__ = "0.1.0"
