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
