"""``--sync-bn``: BatchNorm statistics over the global batch of all training ranks, over MPI.

As ChainerMN's multi-node batch normalisation and torch's SyncBatchNorm do, but on
mpicnn's own communicator: forward allreduces each channel's (sum, sum of squares) and
the sample count, backward the two gradient sums, so a step at n ranks x batch b equals
BatchNorm over one batch of n x b. Ranks with no samples still take part (their sums are
zero). The communicator must be one no other thread uses while backward runs (the
allreduce engine's thread reduces buckets on the world communicator): pass a ``Dup()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def allreduce_sum(comm, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ``comm`` (float64 on the host; a copy on ``tensor``'s device)."""
    host = tensor.detach().to("cpu", torch.float64).contiguous()
    if comm is not None and comm.Get_size() > 1:
        from mpi4py import MPI

        buf = host.numpy()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return host.to(tensor.device)


def _channel_sums(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel sums over every dimension but the channel (dim 1) of ``x`` (times ``y``)."""
    dims = [0, *range(2, x.dim())]
    return (x if y is None else x * y).sum(dim=dims)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation whose statistics and gradient sums are summed over ``comm``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, comm):
        xf = x.float()
        channels = x.shape[1]
        local = torch.cat([_channel_sums(xf), _channel_sums(xf, xf),
                           xf.new_tensor([x.numel() / max(1, channels)])])
        total = allreduce_sum(comm, local)
        count = float(total[-1])
        if count < 1:
            raise ValueError("sync-bn: no rank has a sample in this batch")
        mean64 = total[:channels] / count
        var64 = (total[channels:2 * channels] / count - mean64 * mean64).clamp_min(0)
        mean, var = mean64.float(), var64.float()
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var64 * (count / max(1.0, count - 1))
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype),
                                                    alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count, ctx.comm, ctx.shape = count, comm, shape
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, invstd = ctx.saved_tensors
        shape, count = ctx.shape, ctx.count
        g = grad_out.float()
        sum_dy, sum_dy_xhat = _channel_sums(g), _channel_sums(g, xhat)
        channels = sum_dy.numel()
        # Every rank's loss reaches this rank's inputs through the shared statistics.
        total = allreduce_sum(ctx.comm, torch.cat([sum_dy, sum_dy_xhat])).float()
        mean_dy = (total[:channels] / count).view(shape)
        mean_dy_xhat = (total[channels:] / count).view(shape)
        scale = invstd.view(shape)
        if weight is not None:
            scale = scale * weight.float().view(shape)
        grad_x = (g - mean_dy - xhat * mean_dy_xhat) * scale
        # This rank's own share: the gradient sync combines weight and bias gradients.
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None else None
        return (grad_x.to(grad_out.dtype), grad_w, grad_b, None, None, None, None, None)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of all ranks of ``comm`` in training, running stats in eval.

    Parameters and buffers keep BatchNorm's names, so checkpoints load either way.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.comm = comm

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training or not self.track_running_stats):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:       # cumulative moving average, as BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        track = self.training and self.track_running_stats
        return SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if track else None,
            self.running_var if track else None, self.eps, momentum, self.comm)

    @classmethod
    def convert(cls, module: nn.Module, comm) -> nn.Module:
        """``module`` with every BatchNorm layer replaced by a SyncBatchNorm over ``comm``.

        Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: parameters and buffers are
        taken over, not copied, so an optimizer built before or after sees the same tensors.
        """
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, comm=comm)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert(child, comm))
        return converted


def convert(module: nn.Module, comm) -> nn.Module:
    """Replace the BatchNorm layers of ``module`` by SyncBatchNorm layers over ``comm``."""
    return SyncBatchNorm.convert(module, comm)


def has_sync_bn(module: nn.Module) -> bool:
    """Whether a forward of ``module`` in training is collective (ranks must all run it)."""
    return any(isinstance(m, SyncBatchNorm) for m in module.modules())


__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "convert", "has_sync_bn"]
