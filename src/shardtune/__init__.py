"""shardtune: fine-tune decoder-only models (Llama, Mistral, Qwen, Gemma, ...) with PEFT and PyTorch FSDP2."""
import logging
import warnings

__version__ = "0.1.0"

# Two upstream messages that every run would print and no user can act on: bitsandbytes'
# optional kernel-hub fallback on CPU, and a transformers rename that peft still calls.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "from kernels-community" not in record.getMessage())
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
# torchao 0.17 (needed for NF4 and by peft >= 0.21 whenever it is installed) is imported by
# peft for every LoRA layer; on a CPU build it reports its CUDA-only kernels as missing, and
# torch reports torchao's pytree registrations as deprecated. Neither affects a run.
logging.getLogger("torchao").addFilter(lambda record: not record.getMessage().startswith("Failed to load"))
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is now natively supported by torch.compile" not in record.getMessage())
