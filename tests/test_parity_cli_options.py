"""Each stage of ``parity run`` takes its own options (parity/cli/args.py): an option of another
stage is refused with one line naming it (exit 2), never silently ignored; on ``--resume``
an option that contradicts the run is refused, and an explicit --eval-every /
--checkpoint-every / --keep-checkpoints is honoured.  Everything here ends before any worker
starts (pure Python, in-process)."""
import json
import os

import pytest
from rtdetr_core.config import load_config

from parity.cli.parser import main
from parity.commands import train_steps
from parity.errors import RunError

FOREIGN = [
    ("forward", ["--epochs", "5"], "--epochs"),
    ("grad", ["--split", "val"], "--split"),
    ("grad", ["--resume", "x"], "--resume"),
    ("train", ["--share-decisions"], "--share-decisions"),
    ("train", ["--keep-arrays"], "--keep-arrays"),
    ("train", ["--worst", "3"], "--worst"),
    ("eval", ["--share-decisions"], "--share-decisions"),
    ("eval", ["--epochs", "2"], "--epochs"),
    ("eval", ["--inject-fault", "crash:raise"], "--inject-fault"),
    ("eval", ["--no-reference"], "--no-reference"),
    ("eval", ["--float64-budget", "10"], "--float64-budget"),
]


@pytest.mark.parametrize("stage,extra,name", FOREIGN)
def test_foreign_option_is_refused(stage, extra, name, capsys):
    assert main(["run", "--stage", stage, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0] and stage in err[0], err


def test_dtype_both_only_for_forward_and_grad(capsys):
    assert main(["run", "--stage", "train", "--dtype", "both"]) == 2
    assert "--dtype both" in capsys.readouterr().err


# --- --resume --------------------------------------------------------------------------------

@pytest.fixture
def train_run(tmp_path):
    """A train run folder as far as --resume reads it before anything runs."""
    out = tmp_path / "run"
    case = out / "case"
    case.mkdir(parents=True)
    cfg = load_config("smoke")
    (case / "config.json").write_text(json.dumps(cfg.to_dict()))
    plan = {"epochs": 4, "batch_size": cfg.train.batch_size, "eval_every": 1, "checkpoint_every": 1,
            "keep_checkpoints": 3, "lr_override": None, "limit_images": 4, "limit_val": None, "dtype": "float32",
            "reference": True, "backends": ["torch", "jittor"], "seed": 0, "config": "smoke"}
    (case / "manifest.json").write_text(json.dumps({"plan": plan, "seed": 0}))
    (out / "result.json").write_text(json.dumps({"status": "stopped", "dtype": "float32", "wall_s": 1.0}))
    return out


@pytest.fixture
def stop_before_sides(monkeypatch):
    """Capture the resumed plan and stop where the sides would be made (no worker starts)."""
    seen = {}

    def stop(run, args):
        seen["plan"] = dict(run.plan)
        seen["run"] = run
        raise RunError("stopped by the test")
    monkeypatch.setattr(train_steps, "make_sides", stop)
    return seen


@pytest.mark.parametrize("extra,name", [
    (["--seed", "3"], "--seed"),
    (["--dtype", "float64"], "--dtype"),
    (["--config", "r18vd"], "--config"),
    (["--lr", "0.5"], "--lr"),
    (["--batch-size", "7"], "--batch-size"),
    (["--limit-images", "2"], "--limit-images"),
    (["--no-reference"], "--no-reference"),
])
def test_resume_refuses_a_contradiction(train_run, stop_before_sides, extra, name, capsys):
    before = (train_run / "result.json").read_text()
    assert main(["run", "--stage", "train", "--resume", str(train_run), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0] and "--resume" in err[0], err
    assert "plan" not in stop_before_sides                      # refused before anything else
    assert (train_run / "result.json").read_text() == before    # the run's verdict is left alone


def test_resume_accepts_what_agrees(train_run, stop_before_sides):
    argv = ["run", "--stage", "train", "--resume", str(train_run), "--seed", "0", "--dtype", "float32",
            "--config", "smoke", "--limit-images", "4"]
    assert main(argv) == 2                                      # the test's stop
    assert stop_before_sides["plan"]["epochs"] == 4


@pytest.mark.parametrize("flag,key,value", [
    ("--checkpoint-every", "checkpoint_every", 2),
    ("--checkpoint-every", "checkpoint_every", 0),
    ("--eval-every", "eval_every", 2),
    ("--eval-every", "eval_every", 0),
    ("--keep-checkpoints", "keep_checkpoints", 0),
    ("--keep-checkpoints", "keep_checkpoints", 2),
])
def test_resume_honours_an_explicit_schedule(train_run, stop_before_sides, flag, key, value):
    """Values equal to the fresh-run defaults (0, 2) were once dropped on resume."""
    assert main(["run", "--stage", "train", "--resume", str(train_run), flag, str(value)]) == 2
    assert stop_before_sides["plan"][key] == value


def test_resume_keeps_the_run_schedule_when_not_given(train_run, stop_before_sides):
    assert main(["run", "--stage", "train", "--resume", str(train_run), "--epochs", "6"]) == 2
    plan = stop_before_sides["plan"]
    assert (plan["epochs"], plan["eval_every"], plan["checkpoint_every"], plan["keep_checkpoints"]) == (6, 1, 1, 3)
    run = stop_before_sides["run"]
    assert (run.dtype, run.seed, run.reference) == ("float32", 0, True)


def test_fresh_defaults_fill_in(monkeypatch, tmp_path):
    seen = {}

    def stop(run, args):
        seen["plan"] = dict(run.plan)
        raise RunError("stopped by the test")
    monkeypatch.setattr(train_steps, "make_sides", stop)
    assert main(["run", "--stage", "train", "--out", str(tmp_path / "o"), "--epochs", "1"]) == 2
    p = seen["plan"]
    assert (p["eval_every"], p["checkpoint_every"], p["keep_checkpoints"], p["seed"], p["dtype"]) == (0, 0, 2, 0,
                                                                                                   "float32")
    assert not os.path.exists(tmp_path / "o" / "result.json")
