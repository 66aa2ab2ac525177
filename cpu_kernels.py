"""
Faster CPU paths for two pieces of GPT's forward, used by model.py: the cross-entropy (one exp pass serves the
loss and its gradient) and the token lookup (a sparse gradient: B*T rows, not a zero-filled (vocab, C) tensor).
Each equals torch's own function, which runs wherever these do not apply (a GPU, bf16, under torch.compile).
"""

import torch
import torch.nn.functional as F


def token_embedding(idx, weight):
    """F.embedding(idx, weight): idx (B, T) -> (B, T, C). On CPU (eager) its gradient is sparse, B*T rows added
    into the head's dense gradient of the tied weight; densify_grad, a hook on the weight, makes .grad dense."""
    sparse_grad = idx.device.type == "cpu" and not torch.compiler.is_compiling()
    return F.embedding(idx, weight, sparse=sparse_grad)


def densify_grad(param):
    """A post-accumulate-grad hook: optimizers and DDP need .grad dense."""
    if param.grad.is_sparse:
        param.grad = param.grad.to_dense()


def cross_entropy(logits, targets):
    """Mean cross-entropy over the rows whose target is not -1. logits (N, V), targets (N,).
    CrossEntropyCPU for fp32 CPU eager; F.cross_entropy elsewhere (fused kernels on GPU and under compile)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not torch.compiler.is_compiling():
        return CrossEntropyCPU.apply(logits, targets)
    return F.cross_entropy(logits, targets, ignore_index=-1)


class CrossEntropyCPU(torch.autograd.Function):
    """F.cross_entropy(logits, targets, ignore_index=-1), faster on CPU: one exp pass serves loss and gradient."""

    ROWS_PER_CHUNK = 128  # a chunk's passes stay in cache, and there are few small parallel regions

    @staticmethod
    def forward(ctx, logits, targets):
        N, V = logits.shape
        keep = targets != -1  # (N,)
        safe_targets = targets.clamp(min=0)  # -1 would be an invalid index for gather/scatter
        n_kept = keep.sum()
        need_grad = ctx.needs_input_grad[0]
        # exp(logits - rowmax): kept for backward, where it becomes the gradient in place
        exps = torch.empty_like(logits) if need_grad else None  # (N, V)
        row_max = torch.empty(N, 1, dtype=logits.dtype, device=logits.device)
        row_sum = torch.empty(N, 1, dtype=logits.dtype, device=logits.device)
        for i in range(0, N, CrossEntropyCPU.ROWS_PER_CHUNK):
            rows = slice(i, i + CrossEntropyCPU.ROWS_PER_CHUNK)
            chunk = logits[rows]
            torch.amax(chunk, dim=1, keepdim=True, out=row_max[rows])
            e = torch.sub(chunk, row_max[rows], out=exps[rows] if need_grad else None)
            e.exp_()
            torch.sum(e, dim=1, keepdim=True, out=row_sum[rows])
        log_sum_exp = (row_max + row_sum.log()).squeeze(1)  # (N,)
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (N,)
        loss = torch.where(keep, log_sum_exp - target_logit, 0.0).sum() / n_kept
        if need_grad:
            ctx.save_for_backward(logits, exps, row_sum, safe_targets, keep, n_kept)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, exps, row_sum, safe_targets, keep, n_kept = ctx.saved_tensors
        # d loss / d logits = (softmax - onehot(target)) * grad_loss / n_kept on kept rows, 0 elsewhere
        row_scale = (grad_loss / n_kept) * keep.to(logits.dtype)[:, None]  # (N, 1)
        if torch.is_grad_enabled():
            # create_graph=True (Hessian-vector products, Sophia-H): the same formula from differentiable
            # ops on the saved logits, so that a second backward sees softmax's curvature
            onehot = torch.zeros_like(logits).scatter_(1, safe_targets[:, None], 1.0)
            return (torch.softmax(logits, dim=1) - onehot) * row_scale, None
        grad = exps.mul_(row_scale / row_sum)  # softmax * scale, in the buffer forward filled
        grad.scatter_add_(1, safe_targets[:, None], -row_scale)
        return grad, None
