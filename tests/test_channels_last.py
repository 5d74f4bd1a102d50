"""--channels-last: the model and batches in channels_last, gradients in bucket views that
carry the parameters' strides; the same training as the contiguous run."""
from __future__ import annotations

import pytest
import torch
from conftest import final, initial_params, param_difference, records, train

from mpicnn.sync.allreduce.buckets import build_buckets
from mpicnn.sync.flat import flatten, views
from mpicnn.training.adapt import to_channels_last
from mpicnn.training.models import build_model


def test_bucket_views_share_the_parameters_strides():
    model = to_channels_last(build_model("fashionnet", (1, 8, 8), 10))
    params = list(model.parameters())
    assert any(p.dim() == 4 and not p.is_contiguous() for p in params)
    for p in params:
        p.grad = torch.randn_like(p)
    bucket = build_buckets(params, [list(range(len(params)))])[0]
    assert [v.stride() for v in bucket.views] == [p.stride() for p in params]
    assert all(p.grad is v for p, v in zip(params, bucket.views))     # bound, values kept
    flat = flatten(params)
    assert [v.stride() for v in views(flat, params)] == [p.stride() for p in params]
    assert all(torch.equal(v, p) for v, p in zip(views(flat, params), params))
    # a fused optimizer takes the strided gradients (it rejects mismatched strides)
    torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True).step()
    out = model(torch.randn(3, 1, 8, 8))          # batches converted on the way in
    assert out.shape == (3, 10)


@pytest.mark.mpi
def test_two_ranks_channels_last_equal_contiguous_with_sync_bn(tmp_path):
    """Two launches at 2 ranks (BatchNorm model, --sync-bn): losses and parameters agree."""
    common = ["--model", "fashionnet", "--sync-bn", "--max-steps", 12, "--epochs", 1,
              "--optimizer", "sgd", "--lr", 0.05, "--batch-size", 8, "--seed", 3,
              "--log-every", 4, "--deterministic"]
    plain, _ = train(tmp_path, "plain", 2, *common)
    last, end = train(tmp_path, "last", 2, *common, "--channels-last")
    assert end["steps"] == 12
    a, b = final(plain)["model"], final(last)["model"]
    diff = param_difference(a, b)
    assert diff <= 1e-4, diff
    assert param_difference(initial_params("fashionnet", seed=3), a) > 1e-3    # it trained
    losses = [(r["loss"], s["loss"]) for r, s in zip(records(plain, "interval"),
                                                       records(last, "interval"))]
    assert len(losses) == 3 and all(x == pytest.approx(y, rel=1e-4) for x, y in losses)
