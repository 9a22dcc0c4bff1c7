"""shardtune: fine-tune decoder-only models (Llama, Mistral, Qwen, Gemma, ...) with PEFT and PyTorch FSDP2."""
import logging
import warnings

__version__ = "0.1.0"

# Two upstream messages that every run would print and no user can act on: bitsandbytes'
# optional kernel-hub fallback on CPU, and a transformers rename that peft still calls.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "from kernels-community" not in record.getMessage())
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
