"""The private and version-dependent APIs in shardtune._compat still exist and still mean
what shardtune relies on: an upgrade that changes one fails here, by name."""
import torch

from shardtune import _compat


def test_dynamo_has_the_checkpoint_side_effect_switch():
    assert hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint")
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        _compat.allow_checkpointed_side_effects()
        assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is True


def test_graph_breaks_names_each_cause_once():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    @torch.compile(backend="eager")
    def twice_broken(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x + 1

    assert _compat.graph_breaks() == []
    twice_broken(torch.ones(3))
    twice_broken(torch.ones(4))  # a recompile meets the same break: still one cause
    breaks = _compat.graph_breaks()
    assert len(breaks) == 1 and "graph_break" in breaks[0], breaks
