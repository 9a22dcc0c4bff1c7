"""shardtune.commands."""
