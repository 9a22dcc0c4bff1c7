"""shardtune.metrics."""
