"""--sync-bn: BatchNorm over the global batch of all ranks, by an MPI allreduce."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import mpirun
from torch import nn

from mpicnn.training.syncbn import SyncBatchNorm, convert, has_sync_bn

HERE = Path(__file__).resolve().parent


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))


def test_convert_takes_over_parameters_and_keeps_state_dict_names():
    model = _model()
    params = list(model.parameters())
    synced = convert(copy.deepcopy(model), None)
    assert has_sync_bn(synced) and not has_sync_bn(model)
    assert isinstance(synced[1], SyncBatchNorm) and isinstance(synced[5], SyncBatchNorm)
    assert list(synced.state_dict()) == list(model.state_dict())
    same = convert(model, None)
    assert [p is q for p, q in zip(same.parameters(), params)] == [True] * len(params)


def test_single_process_equals_batchnorm_in_train_and_eval():
    model, x = _model(), torch.randn(6, 3, 8, 8)
    synced = convert(copy.deepcopy(model), None)
    for net in (model, synced):
        for _ in range(2):
            net.zero_grad()
            (net(x) ** 2).sum().backward()
    assert torch.allclose(model(x), synced(x), atol=1e-5)
    for a, b in zip(model.parameters(), synced.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    for a, b in zip(model.buffers(), synced.buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6)
    model.eval(), synced.eval()
    assert torch.allclose(model(x), synced(x), atol=1e-6)


@pytest.mark.mpi
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    """n = 2 x local batches (even, uneven, one rank empty) == BatchNorm on the batch of 16."""
    out = tmp_path / "syncbn.json"
    mpirun(2, [out], script=HERE / "syncbn_check.py", timeout=180)
    result = json.loads(out.read_text())
    assert set(result) == {"even", "uneven", "empty"}
    assert result["empty"]["counts"][0] == 0 and result["uneven"]["counts"] == [3, 13]
    for case, diffs in result.items():
        assert diffs["grad_scale"] > 1e-3, case          # the comparison is not vacuous
        assert diffs["output"] < 1e-5, (case, diffs)
        assert diffs["grads"] < 1e-5 * max(1.0, diffs["grad_scale"]), (case, diffs)
        assert diffs["buffers"] < 1e-6, (case, diffs)
