"""Checkpoints hold CPU tensors whatever the device: they load on a machine without a GPU."""
from __future__ import annotations

import pytest
import torch

from mpicnn.checkpoint import files as checkpoint
from mpicnn.checkpoint.writer import Writer, host_copy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tensors(obj):
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors(item)


def test_host_copy_moves_every_tensor_and_keeps_the_rest():
    live = {"model": {"w": torch.ones(2, 3)}, "optimizer": {"state": {0: {"step": torch.ones(())}},
            "groups": [{"lr": 0.1}]}, "pair": (torch.zeros(1), "x"), "epoch": 3}
    kept = host_copy(live, clone=False)
    cloned = host_copy(live)
    assert all(t.device.type == "cpu" for t in [*tensors(kept), *tensors(cloned)])
    assert kept["model"]["w"].data_ptr() == live["model"]["w"].data_ptr()   # written now
    assert cloned["model"]["w"].data_ptr() != live["model"]["w"].data_ptr()
    assert cloned["optimizer"]["groups"] == [{"lr": 0.1}] and cloned["pair"][1] == "x"
    assert cloned["epoch"] == 3 and isinstance(cloned["pair"], tuple)


def test_a_tensor_off_the_cpu_is_copied_not_passed_through():
    # a meta tensor has no data to copy: moving it fails, passing it through would not
    with pytest.raises(NotImplementedError, match="meta"):
        host_copy({"model": {"w": torch.empty(3, device="meta")}}, clone=False)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_a_saved_checkpoint_holds_cpu_tensors(tmp_path, device, background):
    model = torch.nn.Linear(3, 2).to(device)
    state = {"model": model.state_dict(), "step": torch.tensor(5, device=device)}
    expected = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    writer = Writer(background=background)
    writer.save(state, tmp_path / "final.pt")
    with torch.no_grad():
        model.weight.add_(1)      # the next step, queued behind the copies
    writer.wait()
    plain = torch.load(tmp_path / "final.pt", weights_only=True)     # no map_location
    assert all(t.device.type == "cpu" for t in tensors(plain))
    saved = checkpoint.load(tmp_path / "final.pt")
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    assert saved["step"].item() == 5
