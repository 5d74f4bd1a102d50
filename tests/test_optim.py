"""Optimizers: torch's fused kernels, with the same updates as the per-tensor loop."""
import pytest
import torch

from mpicnn.config import parse_config
from mpicnn.training.optim import build_optimizer


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_matches_the_per_tensor_loop(name):
    cfg = parse_config(["--optimizer", name, "--lr", "0.01"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    fused = build_optimizer(cfg.training, model.parameters(), global_batch=32)
    assert fused.defaults["fused"] is True
    options = {k: v for k, v in fused.defaults.items()
               if k not in ("fused", "foreach", "decoupled_weight_decay")}
    loop = type(fused)(reference, foreach=False, **options)
    for _ in range(10):
        for p, q in zip(model.parameters(), reference):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(model.parameters(), reference):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def two_tensors():
    """A 2-d weight (adapted) and a 1-d bias (excluded), with their gradients."""
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))      # |w| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    return weight, bias


def set_grads(weight, bias):
    weight.grad = torch.tensor([[0.6, 0.8]])                     # |g| = 1
    bias.grad = torch.tensor([0.5, -0.25])


def test_lars_follows_the_published_rule_on_a_hand_computed_case():
    from mpicnn.training.layerwise import LARS

    weight, bias = two_tensors()
    opt = LARS([weight, bias], lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.5)
    set_grads(weight, bias)
    opt.step()
    # ratio = 0.5 * 5 / (1 + 0.1 * 5) = 5/3; v = 0.1 * 5/3 * (g + 0.1 w) = [0.15, 0.2]
    assert torch.allclose(weight, torch.tensor([[2.85, 3.8]]), atol=1e-6, rtol=0)
    # the bias: no ratio, no decay: v = 0.1 g
    assert torch.allclose(bias, torch.tensor([0.95, -1.975]), atol=1e-6, rtol=0)
    set_grads(weight, bias)
    opt.step()
    # |w| = 4.75: ratio = 2.375 / 1.475; (g + 0.1 w) * ratio = [1.425, 1.9];
    # v = 0.9 * [0.15, 0.2] + 0.1 * [1.425, 1.9] = [0.2775, 0.37]
    assert torch.allclose(weight, torch.tensor([[2.5725, 3.43]]), atol=1e-6, rtol=0)
    # v = 0.9 * 0.1 g + 0.1 g = 0.19 g
    assert torch.allclose(bias, torch.tensor([0.95 - 0.095, -1.975 + 0.0475]), atol=1e-6, rtol=0)
    assert set(opt.state[weight]) == {"momentum_buffer"}


def test_lamb_follows_the_published_rule_on_a_hand_computed_case():
    import math

    from mpicnn.training.layerwise import LAMB

    weight, bias = two_tensors()
    opt = LAMB([weight, bias], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.1)
    set_grads(weight, bias)
    opt.step()
    # step 1: bias-corrected m / sqrt(v) = g / |g| elementwise = [1, 1];
    # u = r + 0.1 w = [1.3, 1.4]; w -= 0.1 * (|w| / |u|) * u
    ratio = 5 / math.hypot(1.3, 1.4)
    expected = [3 - 0.1 * ratio * 1.3, 4 - 0.1 * ratio * 1.4]
    assert torch.allclose(weight, torch.tensor([expected]), atol=1e-6, rtol=0)
    # the bias takes Adam's first step: lr * sign(g)
    assert torch.allclose(bias, torch.tensor([0.9, -1.9]), atol=1e-6, rtol=0)
    # step 2 with half the gradient, by the formula of the paper's Algorithm 2
    w1 = weight.detach().clone()
    weight.grad = torch.tensor([[0.3, 0.4]])
    bias.grad = torch.tensor([0.5, -0.25])
    opt.step()
    g0, g1 = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.3, 0.4]])
    m = (0.9 * 0.1 * g0 + 0.1 * g1) / (1 - 0.9 ** 2)
    v = (0.999 * 0.001 * g0 ** 2 + 0.001 * g1 ** 2) / (1 - 0.999 ** 2)
    u = m / v.sqrt() + 0.1 * w1
    assert torch.allclose(weight, w1 - 0.1 * w1.norm() / u.norm() * u, atol=1e-6, rtol=0)
    assert float(opt.state[weight]["step"]) == 2.0
    assert set(opt.state[weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_layerwise_optimizers_from_flags_exclude_batchnorm_and_biases():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    for name, options in (("lars", {"trust_coefficient": 0.001, "momentum": 0.9}),
                          ("lamb", {"betas": (0.9, 0.999)})):
        cfg = parse_config(["--optimizer", name, "--lr", "0.5", "--weight-decay", "0.01"])
        opt = build_optimizer(cfg.training, model.parameters(), global_batch=32)
        assert type(opt).__name__ == name.upper()
        assert all(opt.defaults[k] == v for k, v in options.items())
    from mpicnn.training.layerwise import adapts

    assert [adapts(p) for p in model.parameters()] == [True, False, False, False]


def test_trust_ratio_is_one_for_zero_tensors():
    from mpicnn.training.layerwise import LARS

    weight = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([weight], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5)
    weight.grad = torch.ones(2, 2)
    opt.step()                      # |w| = 0: the step is plain SGD, never NaN
    assert torch.equal(weight, torch.full((2, 2), -0.1))


def test_label_smoothing_reaches_the_training_loss_only():
    from contextlib import contextmanager, nullcontext

    from mpicnn.training.loop import forward_backward

    class Quiet:
        @contextmanager
        def phase(self, name):
            yield

        def zero_grad(self):
            pass

        def no_sync(self):
            return nullcontext()

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    plain = forward_backward(model, Quiet(), Quiet(), x, y, 1)
    smooth = forward_backward(model, Quiet(), Quiet(), x, y, 1, label_smoothing=0.2)
    expected = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.2).item() * 6
    assert smooth == pytest.approx(expected) and smooth != pytest.approx(plain)
    for bad in ("1", "-0.1"):
        with pytest.raises(Exception, match="--label-smoothing must be in"):
            parse_config(["--label-smoothing", bad])
