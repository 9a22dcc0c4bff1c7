"""The model: load.py (meta-device build, per-rank reads, buffers), attention.py (attention
per packed example), loss.py (cross-entropy at the labelled positions only), quant.py (NF4
base weights under FSDP2), tiny.py (tiny Llamas for demos and tests)."""
