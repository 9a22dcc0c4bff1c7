"""shardtune.optim."""
