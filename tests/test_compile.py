"""``--compile``: torch.compile'd forward and backward under the real allreduce engine."""
import pytest
import torch
from conftest import DIGITS, param_difference, trained_params

from mpicnn.config import parse_config
from mpicnn.training.models import build_model

COMMON = ["--data", DIGITS, "--model", "digitnet", "--max-steps", 20, "--epochs", 1,
          "--optimizer", "sgd", "--lr", 0.05, "--batch-size", 16, "--progress", "off",
          "--threads", 1]


@pytest.mark.mpi
@pytest.mark.slow
def test_compiled_two_ranks_average_gradients_like_eager_and_checkpoint_eager_keys(tmp_path):
    """The parameter hooks fire under the compiled backward: 2 compiled ranks train like 2
    eager ranks (not like ranks on their own shards), and final.pt loads into the eager
    model as it is."""
    run, compiled, _ = trained_params(tmp_path, "compiled", 2, [*COMMON, "--compile",
                                                                "default"])
    assert "compile: torch.compile mode default" in run.stdout + run.stderr
    _, eager, _ = trained_params(tmp_path, "eager", 2, COMMON)
    _, alone, _ = trained_params(tmp_path, "alone", 1, COMMON)    # one shard's training
    # inductor reorders float sums (~1e-7 a step); unaveraged gradients move the weights
    # by the difference between the two-rank and one-rank runs
    apart = param_difference(eager, alone)
    assert param_difference(compiled, eager) < 1e-4 < apart / 10
    model = build_model("digitnet", (1, 8, 8), 10)
    state = torch.load(tmp_path / "compiled" / "final.pt", weights_only=True)["model"]
    model.load_state_dict(state)                                  # strict: eager keys


def test_compile_refuses_pipelines_and_overlap_forward():
    from mpicnn.cluster.errors import MpicnnError

    with pytest.raises(MpicnnError, match="pipeline runs it in stages"):
        parse_config(["--compile", "default", "--mode", "pipeline", "--stages", "2"])
    with pytest.raises(MpicnnError, match="--overlap-forward"):
        parse_config(["--compile", "reduce-overhead", "--overlap-forward"])
    assert parse_config(["--compile", "max-autotune"]).training.compile == "max-autotune"
