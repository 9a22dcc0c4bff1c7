#!/usr/bin/env bash
# make demo: 2-process FSDP2 + LoRA fine-tune of a tiny Llama on the bundled SAMSum sample.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo_out
rm -rf "$OUT" && mkdir -p "$OUT"
# a tiny Llama that first learns the bundled training dialogues for 200 steps
$BIN/shardtune tiny "$OUT/tiny-llama" --pretrain_steps 200
$BIN/torchrun --nnodes 1 --nproc_per_node 2 llama_finetuning.py \
    --enable_fsdp --model_name "$OUT/tiny-llama" --use_peft --peft_method lora \
    --dataset samsum_dataset --batch_size_training 4 --num_epochs 8 --lr 1e-2 \
    --context_length 512 --lora_config.r 16 --save_metrics --output_dir "$OUT/adapter"
$BIN/shardtune generate --model_name "$OUT/tiny-llama" --peft_model "$OUT/adapter"
