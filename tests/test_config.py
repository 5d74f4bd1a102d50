"""Config parsing, TOML files and rejection of bad settings."""
import pytest

from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import Config, parse_config


def test_defaults_and_overrides():
    cfg = parse_config([])
    assert cfg == Config()
    cfg = parse_config(["--epochs", "3", "--lr", "0.1", "--betas", "0.8,0.9",
                        "--no-nesterov", "--deterministic", "--lr-milestones", "5,8"])
    training = cfg.training
    assert (training.epochs, training.lr, training.betas, training.nesterov,
            training.deterministic) == (3, 0.1, (0.8, 0.9), False, True)
    assert cfg.training.lr_milestones == (5.0, 8.0)


def test_toml_file_and_flag_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[training]\nepochs = 7\nbatch-size = 4\n[data]\nshuffle = "local"\n')
    cfg = parse_config(["--config", str(path), "--epochs", "9"])
    assert (cfg.training.epochs, cfg.training.batch_size, cfg.data.shuffle) == (9, 4, "local")


def test_dump_round_trips_through_config(tmp_path):
    cfg = parse_config(["--epochs", "4", "--model", "lenet", "--betas", "0.5,0.6"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.dump())
    again = parse_config(["--config", str(path)])
    assert (again.training.epochs, again.training.model, again.training.betas) == \
        (4, "lenet", (0.5, 0.6))


@pytest.mark.parametrize("argv,message", [
    (["--epochz", "3"], "did you mean --epochs"),
    (["--epochs", "three"], "--epochs: expected int"),
    (["--epochs", "2.5"], "--epochs: expected int"),
    (["--optimizer", "adam"], "choose from sgd, adamw"),
    (["--mode", "gossip"], "choose from"),
    (["--batch-size", "0"], "at least 1"),
    (["--lr", "-1"], "positive"),
    (["--val-fraction", "1.5"], "val-fraction"),
    (["--resume", "auto"], "needs --checkpoint-dir"),
    (["--deterministic", "maybe"], "expected bool"),
    (["--config", "/nonexistent/run.toml"], "not found"),
    (["--nan-policy", "ignore"], "invalid choice"),
    (["--stall-warn", "-1"], "must not be negative"),
    (["--stall-abort", "nan"], "must not be negative"),
    (["--keep-checkpoints", "-2"], "must not be negative"),
    (["--augment", "crop,rotate"], "unknown augmentation 'rotate'"),
    (["--prefetch", "-1"], "--prefetch must not be negative"),
    (["--prefetch-mode", "fork"], "invalid choice 'fork'"),
    (["--shuffle-window", "-5"], "--shuffle-window must not be"),
])
def test_bad_settings_are_rejected_with_help(argv, message):
    with pytest.raises(MpicnnError, match=message) as info:
        parse_config(argv)
    assert info.value.collective


def test_bad_toml_keys_and_types(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("epoch = 3\n")
    with pytest.raises(MpicnnError, match="unknown setting 'epoch'.*epochs"):
        parse_config(["--config", str(bad_key)])
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('epochs = "many"\n')
    with pytest.raises(MpicnnError, match="expected int"):
        parse_config(["--config", str(bad_type)])
    bad_syntax = tmp_path / "c.toml"
    bad_syntax.write_text("epochs = = 3\n")
    with pytest.raises(MpicnnError, match="not valid TOML"):
        parse_config(["--config", str(bad_syntax)])
