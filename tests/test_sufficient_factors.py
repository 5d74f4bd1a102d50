"""Sufficient factors: a fully connected layer's gradient rebuilt from the batch's factors.

Pure parts (capture, the rule that picks layers, the bucket plan), then real ranks: the
training equals the one that sends whole gradients, to float rounding.
"""
from __future__ import annotations

import pytest
import torch
from conftest import initial_params, param_difference, trained_params
from torch import nn

from mpicnn.sync.allreduce.buckets import bucket_plan
from mpicnn.sync.allreduce.factors import (
    AUTO_BYTES_GAIN,
    FactorCapture,
    factors_pay,
    worth_factoring,
)


def _head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(inplace=True), nn.Linear(30, 5))


def test_captured_factors_rebuild_the_weight_gradient_past_an_in_place_relu():
    model = _head()
    capture = FactorCapture(model[0])
    model(torch.randn(8, 20)).square().sum().backward()
    factors = capture.take(torch.float32)
    assert factors.shape == (8, 20 + 30)
    inputs, grads = factors[:, :20], factors[:, 20:]
    torch.testing.assert_close(grads.t() @ inputs, model[0].weight.grad)
    assert capture.take(torch.float32).shape == (0, 50)          # taken: cleared


def test_micro_batches_add_up_and_forwards_without_backward_add_nothing():
    model = _head()
    capture = FactorCapture(model[0])
    with torch.no_grad():
        model(torch.randn(3, 20))                                  # evaluation: not kept
    model(torch.randn(2, 20))                                      # never backpropagated
    for _ in range(2):
        model(torch.randn(4, 20)).sum().backward()                 # grads accumulate
    factors = capture.take(torch.float64)
    assert factors.shape == (8, 50) and factors.dtype == torch.float64
    rebuilt = factors[:, 20:].t() @ factors[:, :20]
    torch.testing.assert_close(rebuilt.float(), model[0].weight.grad)
    capture.close()
    model(torch.randn(4, 20)).sum().backward()
    assert capture.take(torch.float32).shape[0] == 0               # closed: no more hooks


def test_layers_are_factored_where_the_factors_are_smaller_by_the_asked_gain():
    # seednet's 4096 x 512 layer: 4 ranks x 8 rows of 4608 values are 14x fewer bytes
    assert factors_pay(4096, 512, 4, 8, gain=AUTO_BYTES_GAIN)
    assert factors_pay(4096, 512, 4, 32, gain=AUTO_BYTES_GAIN)     # 3.6x
    assert not factors_pay(4096, 512, 4, 64, gain=AUTO_BYTES_GAIN)  # 1.8x: not for auto
    assert factors_pay(4096, 512, 4, 64, gain=1)                   # on: still smaller
    assert not factors_pay(512, 10, 4, 8, gain=1)                  # the 10-way classifier
    assert worth_factoring(nn.Linear(4096, 512), 4, 8, 4)
    assert not worth_factoring(nn.Conv2d(64, 64, 3), 4, 1, 1)
    frozen = nn.Linear(4096, 512).requires_grad_(False)
    assert not worth_factoring(frozen, 4, 8, 4)


def test_a_factored_weight_gets_a_bucket_of_its_own_launched_where_it_is_ready():
    params = [torch.zeros(n) for n in (10, 1000, 10, 10)]
    # ready order 3, 2, 1, 0; parameter 1 travels as factors
    plan = bucket_plan(params, [3, 2, 1, 0], cap_bytes=10 ** 6, first_cap_bytes=10 ** 6,
                       alone={1})
    assert plan == [[1], [3, 2, 0]]
    assert bucket_plan(params, [3, 2, 1, 0], 10 ** 6, 10 ** 6) == [[3, 2, 1, 0]]


# --- real ranks -----------------------------------------------------------------------

TRAIN = ["--max-steps", 20, "--epochs", 1, "--deterministic", "--optimizer", "sgd",
         "--lr", 0.05, "--seed", 4, "--bucket-mb", 0.05]
FACTORED = "fully connected 1024x128 sent as the batch's factors"
TWO_NODES = {"MPICNN_RANKS_PER_NODE": "2"}          # 4 ranks as 2 nodes of 2


def _train(tmp_path, name, flags, env=TWO_NODES):
    return trained_params(tmp_path, name, 4, TRAIN + list(flags), env=env)


_difference = param_difference


@pytest.mark.mpi
def test_factored_training_equals_whole_gradients_on_real_ranks(tmp_path):
    _, dense, _ = _train(tmp_path, "dense", ["--sufficient-factors", "off"])
    run, factored, records = _train(tmp_path, "factored", ["--sufficient-factors", "on"])
    assert FACTORED in run.stdout
    assert 0 < _difference(factored, dense) <= 1e-5          # other float order, same sums
    assert records[-1]["event"] == "end" and records[-1]["steps"] == 20
    # micro-batches: the factors of both halves travel once
    _, accumulated, _ = _train(tmp_path, "accum", ["--sufficient-factors", "on",
                                                   "--accum-steps", 2])
    assert _difference(accumulated, dense) <= 1e-5
    # the factors' exchange on into the next forward: bitwise the synchronous step
    overlapped, deferred, _ = _train(tmp_path, "overlap", ["--sufficient-factors", "on",
                                                          "--overlap-forward"])
    assert FACTORED in overlapped.stdout and "lands as its forward" in overlapped.stdout
    assert _difference(deferred, factored) == 0.0
    # without windows every rank multiplies out every rank's factors (above, each rank of
    # a node its share of the rows, from the other node's factors and its own node's sum)
    _, flat, _ = _train(tmp_path, "flat", ["--sufficient-factors", "on", "--shared-memory",
                                          "off"])
    assert 0 < _difference(flat, dense) <= 1e-5
    # one node: the node's sum is the whole sum, so nothing is gathered: bitwise dense
    _, one_dense, _ = _train(tmp_path, "one-dense", ["--sufficient-factors", "off"], env={})
    alone, one_node, _ = _train(tmp_path, "one-node", ["--sufficient-factors", "on"], env={})
    assert FACTORED in alone.stdout and _difference(one_node, one_dense) == 0.0
    # compressed: the factors travel in bf16, the sum is rebuilt in float32. bf16 keeps 8
    # significant bits: 20 steps of such rounding leave 5e-4 here (as much as whole
    # gradients sent in bf16 do); the bound is 4x that, and the factored layer moved
    # more than 10x the bound, so leaving it un-updated (or rebuilding it wrongly) fails
    squeezed, compressed, _ = _train(tmp_path, "bf16", ["--sufficient-factors", "on",
                                                        "--compression", "bf16"])
    assert FACTORED in squeezed.stdout
    bound, layer = 2e-3, "head.1.weight"                   # digitnet's 1024 x 128 weight
    assert _difference(compressed, dense) <= bound
    start = initial_params("digitnet", seed=4)
    assert _difference({layer: start[layer]}, dense) > 10 * bound


@pytest.mark.mpi
def test_auto_factors_across_nodes_only_where_they_are_2x_smaller(tmp_path):
    # 4 ranks x 4 rows x 1152 values: 7x under digitnet's 1024 x 128 weight
    small = ["--batch-size", 4]
    across, _, _ = _train(tmp_path, "across", small)
    assert FACTORED in across.stdout
    one_node, _, _ = _train(tmp_path, "one", small, env={})
    assert "batch's factors" not in one_node.stdout
    # 16 rows a rank: only 1.8x smaller
    big, _, _ = _train(tmp_path, "big", ["--batch-size", 16])
    assert "batch's factors" not in big.stdout


def test_rows_beyond_the_planned_batch_follow_in_a_second_round():
    """One rank (COMM_SELF), planned for 2 rows, gets 5: the gradient is still whole."""
    from mpi4py import MPI

    from mpicnn.sync.allreduce.factors import FactorExchange

    model = _head()
    exchange = FactorExchange(MPI.COMM_SELF, FactorCapture(model[0]), node=[0], capacity=2)
    model(torch.randn(5, 20)).square().sum().backward()
    expected = model[0].weight.grad.clone()
    grad = torch.full((30 * 20,), float("nan"))
    exchange(grad)
    torch.testing.assert_close(grad.view(30, 20), expected)
    exchange.close()
