"""AdamW with user-chosen state dtypes and optional Kahan-compensated updates.

Modelled on torchdistx / llama-recipes ``AnyPrecisionAdamW``.

Why Kahan summation matters: a bf16 weight has only 8 significant bits, so for
a weight of magnitude ~1 the spacing between representable values is ~4e-3.
A typical Adam update (~lr, e.g. 1e-4..1e-3) is below half of that spacing and
``p += update`` rounds straight back to ``p``: the update is silently lost and
pure-bf16 training stalls. With Kahan summation a per-parameter compensation
buffer carries the part of each update that rounding dropped into the next
step, so small updates accumulate until they move the weight and the bf16
weights track an fp32-master-weight run closely, without storing fp32 weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# State buffer -> param-group option naming its dtype.
_STATE_DTYPES = {
    "exp_avg": "momentum_dtype",
    "exp_avg_sq": "variance_dtype",
    "compensation": "compensation_buffer_dtype",
}


class AnyPrecisionAdamW(Optimizer):
    """AdamW (decoupled weight decay, bias correction) with configurable dtypes.

    ``exp_avg`` is kept in ``momentum_dtype``, ``exp_avg_sq`` in
    ``variance_dtype``. If ``use_kahan_summation`` is set, parameters stored in
    bf16/fp16 get a ``compensation`` buffer (``compensation_buffer_dtype``) and
    a Kahan-compensated update; fp32/fp64 parameters are updated directly, as
    rounding there is negligible. With fp32 states and no Kahan this is plain
    ``torch.optim.AdamW``.

    Works with DTensor parameters (FSDP2): state buffers are created with
    ``torch.zeros_like(p, ...)`` and so share the parameter's sharding, and
    only pointwise ops with Python-scalar coefficients are used.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_kahan_summation: bool = True,
        momentum_dtype: torch.dtype = torch.bfloat16,
        variance_dtype: torch.dtype = torch.bfloat16,
        compensation_buffer_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            use_kahan_summation=use_kahan_summation,
            momentum_dtype=momentum_dtype,
            variance_dtype=variance_dtype,
            compensation_buffer_dtype=compensation_buffer_dtype,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None
    ) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr: float = group["lr"]
            weight_decay: float = group["weight_decay"]
            eps: float = group["eps"]

            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AnyPrecisionAdamW does not support sparse gradients")

                kahan = group["use_kahan_summation"] and p.dtype in _LOW_PRECISION
                state = self.state[p]
                if len(state) == 0:
                    # CPU tensor like torch.optim.AdamW, so checkpoints look the same.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=group["momentum_dtype"])
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["variance_dtype"])
                    if kahan:
                        state["compensation"] = torch.zeros_like(
                            p, dtype=group["compensation_buffer_dtype"]
                        )

                state["step"] += 1
                # Python floats, not 0-dim tensors: DTensor refuses to mix
                # DTensors with plain tensors, but accepts scalar coefficients.
                step = float(state["step"].item())
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)

                if kahan:
                    comp = state["compensation"]
                    # Decay goes through the compensation buffer too: lr * wd * p
                    # (~1e-5 * p) is far below bf16 resolution and would be lost
                    # entirely if applied to p directly (as torchdistx does).
                    if weight_decay:
                        comp.add_(p, alpha=-lr * weight_decay)
                    comp.addcdiv_(exp_avg, denom, value=-step_size)
                    # Kahan step: apply the accumulated update, then keep in comp
                    # whatever rounding to p's dtype failed to apply.
                    before = p.detach().clone()
                    p.add_(comp)
                    comp.add_(before.sub_(p))
                else:
                    if weight_decay:
                        p.mul_(1 - lr * weight_decay)
                    p.addcdiv_(exp_avg, denom, value=-step_size)

        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict casts every floating state tensor to its
        # param's dtype, which would silently turn fp32 momentum of a bf16 param
        # into bf16 (lossy) or bf16 states of an fp32 param into fp32 (memory).
        # Re-derive the buffers from the saved values in their intended dtypes.
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for param_id, p in zip(saved_group["params"], group["params"]):
                saved = saved_state.get(param_id, {})
                for key, dtype_option in _STATE_DTYPES.items():
                    if key in saved:
                        # copy=True: never alias the caller's state_dict tensors.
                        self.state[p][key] = saved[key].to(
                            device=p.device, dtype=group[dtype_option], copy=True
                        )
