"""DDP's ``powerSGD_hook`` over gloo with more than one bucket: one gloo group a bucket.

The hook issues a bucket's P and Q Allreduces from completion callbacks, so over gloo
(whose futures complete on its worker threads) one rank may issue bucket 1's P before
bucket 2's uncompressed tensors while another does the opposite. Gloo then aborts the run
("Received data size doesn't match expected size"; resnet18's three buckets at 2x2 did,
the first time). Its collectives per group stay in order when every bucket has a group of
its own, so this runs the unmodified hook with one ``PowerSGDState`` a bucket, each on
its own group, all sharing one step count and one random generator: the draws, the
start and every sum are the stock hook's.
"""
from __future__ import annotations

import math


def bucket_bound(params, cap_bytes: int, first_cap_bytes: int) -> int:
    """The most buckets DDP can make of ``params``: every bucket but the last is full."""
    total = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return 2 + math.ceil(max(0, total - first_cap_bytes) / cap_bytes)


class PowerSGDPerBucketGroup:
    """The state of ``grouped_powersgd_hook``: ``powerSGD_hook`` with bucket i on group i."""

    def __init__(self, groups, **state_args):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook

        self._hook = hook.powerSGD_hook
        self.states = [hook.PowerSGDState(group, **state_args) for group in groups]
        for state in self.states[1:]:
            state.rng = self.states[0].rng       # one stream of draws, in bucket order
        self.steps = 0

    def __call__(self, bucket):
        state = self.states[bucket.index()]
        state.iter = self.steps                  # the step count is the model's, not the bucket's
        future = self._hook(state, bucket)
        if bucket.is_last():
            self.steps += 1
        return future


def grouped_powersgd_hook(state: PowerSGDPerBucketGroup, bucket):
    """A DDP communication hook (DDP wants a function)."""
    return state(bucket)


def register(ddp, params, **state_args) -> PowerSGDPerBucketGroup:
    """Give ``ddp`` the hook with as many gloo groups as it can have buckets (collective)."""
    import torch.distributed as dist

    count = bucket_bound(params, int(ddp.bucket_bytes_cap), dist._DEFAULT_FIRST_BUCKET_BYTES)
    groups = [dist.new_group(backend="gloo") for _ in range(count)]
    hook = PowerSGDPerBucketGroup(groups, **state_args)
    ddp.register_comm_hook(hook, grouped_powersgd_hook)
    return hook
