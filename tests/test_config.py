"""Config parsing, TOML files, rejection of bad settings, and the CLI's conventions."""
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT

from mpicnn.cluster.errors import MpicnnError
from mpicnn.config import FIELDS, Config, build_parser, parse_config


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


# --- CLI conventions: off, units, negations, --print-config ------------------------------

EVERY_KIND = [       # a non-default value of every kind of setting, TOML's awkward ones too
    "--epochs", "4", "--model", "lenet", "--betas", "0.5,0.6", "--lr", "1e-07",
    "--no-nesterov", "--deterministic", "--lr-milestones", "5,8.5", "--stall-abort", "inf",
    "--metrics", 'runs/a "quoted"\\path\tü\x7f.jsonl', "--compression", "bf16",
    "--max-steps", "off", "--slow-rank", "none", "--keep-checkpoints", "0", "--augment", "",
    "--stop-check-every", "off", "--checkpoint-every", "3", "--amp", "bf16",
]


def test_print_config_writes_a_toml_that_config_reads_back_identically(tmp_path, capsys):
    cfg = parse_config(EVERY_KIND)
    with pytest.raises(SystemExit) as done:
        parse_config([*EVERY_KIND, "--print-config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.toml"
    path.write_text(printed)
    again = parse_config(["--config", str(path)])
    again.output.config = ""                     # the one setting that names the file read
    assert again == cfg
    assert parse_config([]) != cfg               # (the values above are not the defaults)
    assert 'max_steps = "off"' in printed and "# stop after this many optimizer steps" in printed


def test_print_config_from_the_command_line_prints_only_toml(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mpicnn.train", "--print-config",
                           "--batch-size", "8"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert tomllib.loads(done.stdout)["training"]["batch_size"] == 8


@pytest.mark.parametrize("argv,section,name,off", [
    (["--max-steps", "{}"], "training", "max_steps", 0),
    (["--clip-grad-norm", "{}"], "training", "clip_grad_norm", 0.0),
    (["--compression", "{}"], "sync", "compression", "none"),
    (["--staleness", "{}"], "sync", "staleness", "none"),
    (["--slow-rank", "{}"], "sync", "slow_rank", -1),
    (["--bucket-mb", "{}"], "sync", "bucket_mb", 0.0),
    (["--checkpoint-dir", "{}"], "output", "checkpoint_dir", ""),
    (["--keep-checkpoints", "{}"], "output", "keep_checkpoints", 0),
    (["--stall-warn", "{}"], "failure", "stall_warn", 0.0),
    (["--stop-check-every", "{}"], "failure", "stop_check_every", 0),
    (["--prefetch", "{}"], "data", "prefetch", 0),
    (["--amp", "{}"], "training", "amp", "off"),
])
def test_off_is_one_word_and_the_old_spellings_still_work(argv, section, name, off):
    for word in ("off", "OFF", "none", ""):
        cfg = parse_config([a.format(word) for a in argv])
        assert getattr(getattr(cfg, section), name) == off, word
    old = {"slow_rank": "-1", "compression": "none", "staleness": "none", "amp": "off",
           "checkpoint_dir": ""}.get(name, "0")
    assert getattr(getattr(parse_config([argv[0], old]), section), name) == off


def help_of(text: str, option: str, next_option: str) -> str:
    """The help paragraph of ``option`` in ``--help``'s text, on one line."""
    after = text.split("\n  " + option, 1)[1].split("\n  " + next_option)[0]
    return " ".join(after.split())


def test_help_shows_negations_units_off_and_one_default():
    text = build_parser().format_help()
    switches = [name for name, (_, f) in FIELDS.items() if type(f.default) is bool]
    assert len(switches) > 5
    for name in switches:
        option = "--" + name.replace("_", "-")
        assert f"{option} [BOOL], --no-{option[2:]}" in text
    for shows in ("--checkpoint-every-epochs EPOCHS", "--log-every STEPS",
                  "--stop-check-every STEPS|off", "--stall-warn SECONDS|off",
                  "--compression fp16|bf16|powersgd[:RANK]|off", "--max-steps STEPS|off"):
        assert shows in text
    data = help_of(text, "--data FILE", "--images-key")
    assert data == "HDF5 dataset (default: the shipped digits dataset)"
    accum = help_of(text, "--accum-steps K", "--mode")
    assert "splits each rank's --batch-size batch" in accum and "multiply the batch" in accum
    assert "--batch-size B*K --accum-steps K" in accum
    assert "--checkpoint-every " not in text      # the old name: accepted, not shown


def test_renamed_settings_keep_their_old_names(tmp_path):
    assert parse_config(["--checkpoint-every", "3"]).output.checkpoint_every_epochs == 3
    old = tmp_path / "old.toml"                  # a config.toml from before the rename
    old.write_text("[output]\ncheckpoint_every = 4\n")
    assert parse_config(["--config", str(old)]).output.checkpoint_every_epochs == 4
    assert parse_config(["--config", str(old), "--checkpoint-every-epochs", "5"]) \
        .output.checkpoint_every_epochs == 5


def test_switches_take_a_value_or_their_negation_but_not_both():
    assert parse_config(["--cache"]).data.cache is True
    assert parse_config(["--cache", "off"]).data.cache is False
    assert parse_config(["--cache", "--no-cache"]).data.cache is False
    with pytest.raises(MpicnnError, match="--no-cache takes no value"):
        parse_config(["--no-cache", "true"])
    with pytest.raises(MpicnnError, match="--max-steps: expected int or off"):
        parse_config(["--max-steps", "never"])


def test_the_restart_supervisor_reads_off_as_no_checkpoint_dir():
    from mpicnn.resilience.supervisor import Policy, Supervisor

    def resumes(*args) -> bool:
        return Supervisor(["mpirun", "python", "-m", "mpicnn.train", *args], Policy(),
                          env={}).can_resume

    assert resumes("--checkpoint-dir", "ckpt") and resumes("--config", "run.toml")
    assert not resumes("--checkpoint-dir", "off") and not resumes("--checkpoint-dir", "")
    assert not resumes()
