"""build.py: the optimizer, LR schedule and grad scaler from the configs; anyprecision.py:
AnyPrecisionAdamW with Kahan summation."""
