"""Tests for shardtune.anyprecision.AnyPrecisionAdamW (CPU, a few seconds)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from shardtune.optim.anyprecision import AnyPrecisionAdamW

MakeOpt = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed linear regression: y = X @ W_true + noise, W_true of magnitude ~1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    w_true = 0.5 + 0.5 * torch.randn(16, 1, generator=g)
    y = x @ w_true + 0.01 * torch.randn(64, 1, generator=g)
    return x, y


def _train(make_opt: MakeOpt, dtype: torch.dtype, steps: int) -> torch.Tensor:
    """Train a 16x1 weight (init 0.5) with MSE; returns final weights in fp32.

    The loss is computed in fp32 from ``w.float()``; autograd casts the gradient
    back to ``w``'s dtype, so a bf16 weight gets a bf16 gradient.
    """
    x, y = _problem()
    w = torch.nn.Parameter(torch.full((16, 1), 0.5, dtype=dtype))
    opt = make_opt([w])
    for _ in range(steps):
        opt.zero_grad()
        ((x @ w.float() - y) ** 2).mean().backward()
        opt.step()
    return w.detach().float()


# state_dtype fp32 isolates the effect under test (rounding of the bf16 weight
# update); bf16 is the optimizer's default pure-bf16 configuration.
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_kahan_tracks_fp32_reference(state_dtype: torch.dtype) -> None:
    # lr=1e-3: Adam's update (~lr) is below half a bf16 ulp at 0.5 (~2e-3),
    # so plain bf16 updates round away, while the fp32 run moves ~0.19.
    lr, steps = 1e-3, 200
    ref = _train(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), torch.float32, steps)

    def any_precision(kahan: bool) -> MakeOpt:
        return lambda p: AnyPrecisionAdamW(
            p,
            lr=lr,
            use_kahan_summation=kahan,
            momentum_dtype=state_dtype,
            variance_dtype=state_dtype,
        )

    drift_kahan = (_train(any_precision(True), torch.bfloat16, steps) - ref).abs().max().item()
    drift_plain = (_train(any_precision(False), torch.bfloat16, steps) - ref).abs().max().item()
    print(f"\nstate_dtype={state_dtype}: drift kahan={drift_kahan:.6f} no_kahan={drift_plain:.6f}")

    assert drift_plain >= 0.1, "bf16 without Kahan should visibly lag the fp32 run"
    assert drift_kahan * 5 <= drift_plain


def test_matches_torch_adamw_in_fp32() -> None:
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ref = _train(lambda p: torch.optim.AdamW(p, **kwargs), torch.float32, 20)
    ours = _train(
        lambda p: AnyPrecisionAdamW(
            p,
            **kwargs,
            use_kahan_summation=False,
            momentum_dtype=torch.float32,
            variance_dtype=torch.float32,
        ),
        torch.float32,
        20,
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_kahan_keeps_small_weight_decay() -> None:
    # With zero gradients only decay acts: p *= (1 - lr*wd) = (1 - 1e-3) per
    # step, a change below half a bf16 ulp at 1.0, so it only survives via the
    # compensation buffer.
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = AnyPrecisionAdamW([w], lr=1e-2, weight_decay=0.1)
    for _ in range(100):
        w.grad = torch.zeros_like(w)
        opt.step()
    torch.testing.assert_close(w.float(), torch.full((8,), 0.999**100), rtol=0, atol=4e-3)


def test_load_state_dict_keeps_state_dtypes() -> None:
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = AnyPrecisionAdamW([w], momentum_dtype=torch.float32)
    w.grad = torch.full_like(w, 0.1)
    opt.step()
    saved = opt.state_dict()
    exp_avg = saved["state"][0]["exp_avg"].clone()

    fresh = AnyPrecisionAdamW([w], momentum_dtype=torch.float32)
    fresh.load_state_dict(saved)
    state = fresh.state[w]
    assert state["exp_avg"].dtype == torch.float32  # not cast to the bf16 param dtype
    assert torch.equal(state["exp_avg"], exp_avg)
    assert state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["compensation"].dtype == torch.bfloat16


def test_dtensor_params_match_plain_tensors(tmp_path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    # a group an earlier in-process test left is a one-rank group too (pytest is one process): use it
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        mesh = init_device_mesh("cpu", (1,))
        init = torch.linspace(0.5, 1.5, 16, dtype=torch.bfloat16).reshape(4, 4)
        plain = torch.nn.Parameter(init.clone())
        sharded = torch.nn.Parameter(distribute_tensor(init.clone(), mesh, [Shard(0)]))
        opts = [AnyPrecisionAdamW([p], lr=1e-3, weight_decay=0.01) for p in (plain, sharded)]
        grad = torch.linspace(-1.0, 1.0, 16, dtype=torch.bfloat16).reshape(4, 4)
        for _ in range(5):
            plain.grad = grad.clone()
            sharded.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            for opt in opts:
                opt.step()
        assert type(opts[1].state[sharded]["compensation"]).__name__ == "DTensor"
        assert torch.equal(sharded.full_tensor(), plain.detach())
    finally:
        if own_group:
            dist.destroy_process_group()


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1e-3), dict(eps=-1.0), dict(betas=(1.0, 0.999)), dict(weight_decay=-0.1)],
)
def test_rejects_invalid_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AnyPrecisionAdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)
