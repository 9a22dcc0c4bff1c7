"""What a run reports: logs.py (metrics.jsonl, rank-0 logging), sinks.py (TensorBoard,
wandb), throughput.py (tokens/s, MFU), curve.py (loss.png), scores.py (ROUGE, GLEU)."""
