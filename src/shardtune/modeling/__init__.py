"""shardtune.modeling."""
