"""shardtune.config."""
