"""
Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated momentum,
the paper's other baseline. Its settings are checked and its sharded (DTensor) parameters updated as SophiaG's.
"""

import torch
from torch.optim import Optimizer

from sophia import _check_hyperparameters, _local


class Lion(Optimizer):
    """θ ← θ·(1 − lr·wd);  θ ← θ − lr·sign(β1·m + (1 − β1)·g);  m ← β2·m + (1 − β2)·g.
    One buffer per parameter (exp_avg). Multi-tensor (torch._foreach_*) ops, one group at a time."""

    def __init__(self, params, lr=1e-4, betas=(0.95, 0.98), weight_decay=0.0):
        _check_hyperparameters(lr, betas, weight_decay, example_lr=1e-4, example_betas=(0.95, 0.98))
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if len(self.state[p]) == 0:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # sharded (DTensor) parameters: the local shards, as in SophiaG
            exp_avgs = [_local(self.state[p]["exp_avg"]) for p in params]
            grads = [_local(p.grad) for p in params]
            params = [_local(p) for p in params]
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            update = torch._foreach_mul(exp_avgs, beta1)           # β1·m + (1 − β1)·g, then its sign
            torch._foreach_add_(update, grads, alpha=1 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            del update
            torch._foreach_mul_(exp_avgs, beta2)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)
        return loss
