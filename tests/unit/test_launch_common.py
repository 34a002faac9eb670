"""``launch.common.hydra_main``'s command-line rewriting, in process with Hydra's app stubbed out:
what Hydra is handed for single runs and sweeps, and that the overrides are parsed once."""

from __future__ import annotations

import sys

import hydra
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

import slurm.submit
from dpo_dist.runinfo import COMMAND_ENV, command_line
from launch import common

PROG = "dpo-train"


def hand_over(monkeypatch, *argv: str) -> tuple[list[str], int]:
    """(the ``sys.argv`` hydra_main gives Hydra for ``argv``, how often launch.common parsed overrides)."""
    parses = [0]
    for name in ("parse_overrides", "parse_override"):
        real = getattr(OverridesParser, name)

        def counting(self, *args, _real=real, **kwargs):
            # Hydra parses overrides again while composing: count launch.common's own calls only.
            if sys._getframe(1).f_globals.get("__name__") == common.__name__:
                parses[0] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(OverridesParser, name, counting)
    handed = []
    monkeypatch.setattr(hydra, "main", lambda **_: lambda task: lambda: handed.append(sys.argv[1:]))
    # It wraps the submitit launcher plugin for the rest of the process; nothing is launched here.
    monkeypatch.setattr(slurm.submit, "report_sweep_failures", lambda on_failure: None)
    monkeypatch.setattr(sys, "argv", [PROG, *argv])
    monkeypatch.setenv(COMMAND_ENV, "")  # hydra_main records the command there: restored afterwards
    common.hydra_main(PROG, lambda cfg: None)
    return handed[0], parses[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        # A single run's Hydra directory is its output_dir.
        (["loss.beta=0.2", "output_dir=/runs/a"], ["hydra.run.dir=/runs/a", "loss.beta=0.2", "output_dir=/runs/a"]),
        # A sweep's output_dir is the sweep directory, each point in a numbered subdirectory.
        (["-m", "loss.beta=0.1,0.2", "output_dir=/runs/s"], ["hydra.sweep.dir=/runs/s", "loss.beta=0.1,0.2", "-m"]),
        # A swept output_dir gives each point its own directory.
        (["-m", "output_dir=/runs/a,/runs/b"], ["output_dir=/runs/a,/runs/b", "-m"]),
        (["-m", "loss.beta=0.1,0.2"], ["loss.beta=0.1,0.2", "-m"]),
    ],
)
def test_overrides_are_parsed_once_and_handed_to_hydra(monkeypatch, argv, expected):
    handed, parses = hand_over(monkeypatch, *argv)
    assert handed == [f"hydra.job.name={PROG}", *expected]
    assert parses == 1


def test_a_slurm_sweep_parses_its_overrides_once(monkeypatch):
    handed, parses = hand_over(monkeypatch, "-m", "cluster=slurm", "loss.beta=0.1,0.2", "output_dir=/runs/s")
    assert handed[:2] == [f"hydra.job.name={PROG}", "hydra/launcher=dpo_slurm"]
    assert any(arg.startswith("++hydra.launcher.") for arg in handed)
    assert handed[-4:] == ["hydra.sweep.dir=/runs/s", "cluster=slurm", "loss.beta=0.1,0.2", "-m"]
    assert parses == 1


def test_a_swept_cluster_key_is_refused_on_slurm(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hand_over(monkeypatch, "-m", "cluster=slurm", "cluster.nodes=1,2")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"{PROG}: error: cluster.nodes is swept, but one Slurm job array")


def test_an_evaluation_inherits_the_runs_settings_unless_overridden():
    """dpo-eval output_dir=RUN: the run's model (the reference), data and loss settings, not the
    defaults (an SFT->DPO chain was judged against the bundled base); the user's overrides win."""
    from dpo_dist.runinfo import inherit_run_settings

    composed = {
        "output_dir": "RUN",
        "stage": "dpo",
        "model": {"path": "/bundled", "lora": {"r": 0, "alpha": 16}, "dtype": "auto"},
        "data": {"eval_path": "/bundled/eval.jsonl", "max_length": 256},
        "loss": {"name": "sigmoid", "beta": 0.3},
        "eval": {"max_prompts": 5},
    }
    run = {
        "output_dir": "elsewhere",
        "stage": "dpo",
        "model": {"path": "RUN/sft/final", "lora": {"r": 8, "alpha": 32}, "dtype": "auto"},
        "data": {"eval_path": "/custom/eval.jsonl", "max_length": 512},
        "loss": {"name": "ipo", "beta": 0.1},
        "eval": {"max_prompts": 100},
    }
    merged = inherit_run_settings(composed, run, ["output_dir", "eval.max_prompts", "model.lora.alpha"])
    assert merged["model"] == {"path": "RUN/sft/final", "lora": {"r": 8, "alpha": 16}, "dtype": "auto"}
    assert merged["data"] == run["data"] and merged["loss"] == run["loss"]
    assert merged["output_dir"] == "RUN" and merged["eval"] == {"max_prompts": 5}  # never inherited
    assert inherit_run_settings(composed, run, ["loss"])["loss"] == composed["loss"]  # loss=<preset> chosen anew
    assert run["model"]["lora"]["alpha"] == 32  # the run's dict is not modified
    # A TR-DPO run's moving reference: the evaluation scores against the initial model, with
    # any reference.mode (its sync_every would refuse mode=precompute).
    tr_dpo = {**run, "reference": {"mode": "online", "sync_every": 4, "sync_alpha": 0.5}}
    evaluated = inherit_run_settings({**composed, "reference": {"mode": "precompute"}}, tr_dpo, ["reference.mode"])
    assert evaluated["reference"] == {"mode": "precompute", "sync_every": 0, "sync_alpha": 0.5}
    assert tr_dpo["reference"]["sync_every"] == 4


def test_a_resumed_run_still_says_it_computed_its_reference_cache(tmp_path):
    """run_info.json's reference.computed is about the run: the job that resumes it reuses the
    cache its first job computed, and must not flip the answer to false."""
    from dpo_dist.runinfo import read_run_info, write_run_info

    first = {"resumed_from_step": 0, "reference": {"cache_dir": "/c/a", "computed": True}}
    write_run_info(tmp_path, first)
    write_run_info(tmp_path, {"resumed_from_step": 4, "reference": {"cache_dir": "/c/a", "computed": False}})
    assert read_run_info(tmp_path)["reference"] == {"cache_dir": "/c/a", "computed": True}
    # Another cache (the inputs changed between jobs) was not computed by this run.
    write_run_info(tmp_path, {"resumed_from_step": 6, "reference": {"cache_dir": "/c/b", "computed": False}})
    assert read_run_info(tmp_path)["reference"] == {"cache_dir": "/c/b", "computed": False}
    # A fresh start reports what it did.
    write_run_info(tmp_path, {"resumed_from_step": 0, "reference": {"cache_dir": "/c/b", "computed": False}})
    assert read_run_info(tmp_path)["reference"]["computed"] is False


def test_wandb_online_without_a_login_is_one_config_error(monkeypatch, tmp_path):
    """wandb.mode=online with no API key was a traceback after the reference pass; now one line,
    raised where train() starts W&B, before any model work."""
    import wandb

    from dpo_dist.config import ConfigError, config_from_dict
    from dpo_dist.distributed import DistEnv
    from dpo_dist.engine import init_wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    cfg = config_from_dict({"output_dir": str(tmp_path), "wandb": {"mode": "online"}})
    env = DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, slurm_job_id=None)
    with pytest.raises(ConfigError, match=r"^wandb.mode=online: No API key configured\. .*wandb.mode=offline\)$"):
        init_wandb(cfg, env)


def test_a_dying_wandb_service_stops_wandb_logging_not_training(caplog):
    """Slurm signals every process of a preempted job step, W&B's service included: the next
    run.log raised ConnectionResetError and the run died before its preemption checkpoint."""
    import logging

    from dpo_dist.engine import WandbSink

    class DeadService:
        calls = 0

        def log(self, row, step):
            DeadService.calls += 1
            raise ConnectionResetError("Connection lost")

        def finish(self):
            raise AssertionError("not called once logging has stopped")

    sink = WandbSink(DeadService())
    with caplog.at_level(logging.WARNING, logger="dpo_dist.engine"):
        sink.log({"loss": 0.5}, step=3)
        sink.log({"loss": 0.4}, step=4)
        sink.finish()
    assert DeadService.calls == 1 and sink.run is None
    assert [r.getMessage() for r in caplog.records] == [
        "W&B log failed (ConnectionResetError: Connection lost): W&B logging stops; metrics.jsonl has every row"
    ]
    WandbSink(None).log({"loss": 0.5}, step=1)  # disabled, or not rank 0: nothing


def test_a_slurm_sweep_is_checked_point_by_point_before_submitting(tmp_path):
    """A single job's memory plan and data are checked before sbatch; a sweep's points ran those
    checks inside their array jobs, after waiting for GPUs. Now every point is checked first
    (nothing here can submit: no Slurm is configured for this process)."""
    from tests.helpers import REPO, run_cli

    shape = REPO / "dpo_dist" / "assets" / "model_shapes" / "llama3_70b.json"
    too_big = run_cli("launch.train", "-m", "experiment=llama3_70b_64gpu", "cluster.nodes=2",
                      "loss.beta=0.1,0.2", f"model.path={shape}", f"output_dir={tmp_path / 'a'}")
    assert too_big.returncode == 2
    line = too_big.stderr.strip().splitlines()[-1]
    assert line.startswith("dpo-train: error: memory plan: does not fit: per-GPU peak") and "on 16 GPUs" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    bad_data = run_cli("launch.train", "-m", "cluster=slurm", "loss.beta=0.1,0.2", f"data.train_path={bad}",
                       f"output_dir={tmp_path / 'b'}")
    assert bad_data.returncode == 2
    assert bad_data.stderr.strip().splitlines()[-1].startswith(f"dpo-train: error: {bad}: 1 invalid record")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing was submitted


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["loss.beta=0.1,0.2", "output_dir=/runs/s"], ["/runs/s/0", "/runs/s/1"]),  # hydra_main's hydra.sweep.dir
        (["loss.beta=0.1,0.2", "hydra.sweep.dir=/runs/h/"], ["/runs/h/0", "/runs/h/1"]),
        (["output_dir=/runs/s", "loss.beta=0.1,0.2", "hydra.sweep.dir=/runs/h"], ["/runs/h/0", "/runs/h/1"]),  # Hydra's wins
        (["output_dir=/runs/a,/runs/b", "loss.beta=0.1,0.2"], ["/runs/a", "/runs/a", "/runs/b", "/runs/b"]),
        (["loss.beta=0.1,0.2", "optim.lr=1e-4,2e-4,3e-4", "output_dir=/runs/s"], [f"/runs/s/{i}" for i in range(6)]),
        (["loss.beta=0.1,0.2"], [None, None]),  # multirun/DATE/TIME: a new directory
        (["loss.beta=0.1,0.2", "hydra.sweep.dir=m/${now:%H-%M-%S}"], [None, None]),
        (["loss.beta=0.1,0.2", "output_dir=/runs/s", "hydra.sweep.subdir=b${loss.beta}"], [None, None]),
    ],
)
def test_a_sweep_points_output_dir_is_known_where_the_command_fixes_it(argv, expected):
    """What the Slurm sweep preflight checks (run dir settings, lock) before submitting: the
    directory each of Hydra's job numbers (the product of the swept values, in order) trains in."""
    parsed = common.parse_overrides(PROG, argv)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [raw]
        for raw, o in zip(argv, parsed)
        if not o.get_key_element().startswith("hydra.")
    ]
    import itertools

    combos = list(itertools.product(*choices))
    assert [common.sweep_point_dir(argv, parsed, list(c), i) for i, c in enumerate(combos)] == expected


@pytest.mark.parametrize("cluster", ["slurm", "local"])
def test_a_sweep_into_points_that_hold_other_runs_is_refused_before_any_runs(tmp_path, cluster):
    """Re-running a sweep into the same sweep directory with new values: each Slurm point's ranks
    refused its directory inside the array job, after queueing (a local sweep trained point 0 and
    then failed point 1); a point another job still trains in likewise. Both are now refused
    before any point runs or is queued, in one line."""
    from dpo_dist.runinfo import RunLock
    from tests.helpers import run_cli

    sweep = tmp_path / "sweep"
    written = run_cli("slurm.write_config", f"output_dir={sweep / '1'}", "loss.beta=0.5")
    assert written.returncode == 0, written.stderr
    (sweep / "1" / "final").mkdir()
    result = run_cli("launch.train", "-m", f"cluster={cluster}", "loss.beta=0.1,0.2", f"output_dir={sweep}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"dpo-train: error: output_dir={sweep / '1'} holds a run trained with other settings (loss.beta: 0.5 -> 0.2): "
        "resume it with its own settings, or train into a new output_dir"
    )
    with RunLock(sweep / "0"):  # an earlier sweep's point 0, still training
        held = run_cli("launch.train", "-m", f"cluster={cluster}", "loss.beta=0.1,0.2", f"output_dir={sweep}")
    assert held.returncode == 2
    assert held.stderr.strip().splitlines()[-1].startswith(f"dpo-train: error: output_dir={sweep / '0'} is in use by another training job (host ")
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1"] and not (sweep / ".submitit").exists()


def test_hydra_settings_are_not_validated_against_the_schema():
    """hydra.launcher.array_parallelism exists on the Slurm launcher only; validation composes with
    Hydra's basic launcher and refused it (README's sweep command)."""
    from launch.common import check_overrides, register_schema

    register_schema()
    clusters = check_overrides("dpo-train", ["cluster=slurm", "loss.beta=0.1,0.2", "hydra.launcher.array_parallelism=2"])
    assert [c.name for c in clusters] == ["slurm", "slurm"]


def test_the_users_command_is_what_run_info_records(monkeypatch):
    """The ranks run `python -m dpo_dist.worker ...` (or submitit's script): run_info.json's argv is
    the command the user typed, handed to them through the environment."""
    hand_over(monkeypatch, "loss.beta=0.2", "output_dir=/runs/a")
    assert command_line() == [PROG, "loss.beta=0.2", "output_dir=/runs/a"]
    monkeypatch.setenv(COMMAND_ENV, "")
    assert command_line() == sys.argv  # a worker started by hand (slurm/dpo_train.sbatch)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--cfg", "job", "loss.betaa=1"], "Could not override 'loss.betaa'"),
        (["-c", "job", "loss.beta=abc"], "Error merging override loss.beta=abc"),
        (["-m", "--cfg", "job", "loss.beta=0.1,0.2"], "-m cannot be combined with --cfg or --info"),
        (["-m", "--info", "loss.beta=0.1,0.2"], "-m cannot be combined with --cfg or --info"),
    ],
)
def test_printing_the_config_validates_it_in_one_line(monkeypatch, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        hand_over(monkeypatch, *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: {expected}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--cfg", "job", "loss.beta=0.3"],
        # Still to be filled in (model.path is required for model=llama3_8b): printed, not refused.
        ["--cfg", "job", "model=llama3_8b"],
        ["--cfg", "hydra", "model=llama3_8b"],
        ["-c", "job", "data=custom"],
    ],
)
def test_printing_a_composable_config_is_handed_to_hydra(monkeypatch, argv):
    handed, _ = hand_over(monkeypatch, *argv)
    overrides = [a for a in argv if "=" in a]
    assert handed == [f"hydra.job.name={PROG}", *overrides, *[a for a in argv if a not in overrides]]


def test_a_local_sweep_goes_on_past_a_failed_point_and_names_it(tmp_path):
    """Point 0's data has a bad record, point 1's file is empty: both run (the second is not
    skipped because the first failed), each failure names its point, and the command exits 1."""
    from tests.helpers import run_cli

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    paths = f"{tmp_path / 'bad.jsonl'},{tmp_path / 'empty.jsonl'}"
    result = run_cli(
        "launch.train", "-m", "data=custom", f"data.train_path={paths}", "data.eval_path=null",
        "train.max_steps=1", f"output_dir={tmp_path / 'sweep'}", "wandb.mode=disabled",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("dpo-train: error: ")]
    assert errors[0].startswith("dpo-train: error: point 0 (") and "missing key 'rejected'" in errors[0]
    assert errors[1].startswith("dpo-train: error: point 1 (") and "going on with the other points" in errors[1]
    assert errors[-1].startswith("dpo-train: error: 2 of 2 sweep points failed: point 0 (")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("status, state", [(1, "failed"), (75, "preempted")])
def test_a_crashed_local_run_says_so_in_status_json(tmp_path, status, state):
    """dpo-report reads status.json: a local training run whose ranks crashed or were preempted
    gets the state (and why), as a Slurm run's ranks write it, not "incomplete"."""
    from dpo_dist.config import config_from_dict
    from dpo_dist.launcher import LaunchError
    from dpo_dist.report import run_status
    from launch.run import record_local_failure
    from slurm.runtime import read_status

    cfg = config_from_dict({"output_dir": str(tmp_path)})
    record_local_failure(cfg, LaunchError("rank 1 exited with status 1", status))
    record = read_status(tmp_path)
    assert record["state"] == state and record["message"] == "rank 1 exited with status 1"
    assert run_status(tmp_path, record) == state


def test_settings_that_do_not_do_what_they_seem_are_warned(caplog):
    """LoRA settings without model.lora.r (full weights are trained), and a tiny-model learning rate
    for full-weight training of a large model (model=tiny's 2e-4 with model.path at a real model)."""
    import logging

    from dpo_dist.config import config_from_dict
    from launch.run import warn_high_learning_rate, warn_unused_lora_settings
    from tests.helpers import REPO

    shapes = REPO / "dpo_dist" / "assets" / "model_shapes"
    caplog.set_level(logging.WARNING, logger="dpo_dist")

    def warnings(check, **values):
        caplog.clear()
        check(config_from_dict({"output_dir": "x", **values}))
        return [r.getMessage() for r in caplog.records]

    assert warnings(warn_unused_lora_settings, model={"lora": {"alpha": 32, "dropout": 0.1}}) == [
        "model.lora.alpha, model.lora.dropout set but model.lora.r=0: this run trains the full weights and ignores them"
    ]
    assert warnings(warn_unused_lora_settings, model={"lora": {"r": 8, "alpha": 32}}) == []
    big = {"name": "tiny", "path": str(shapes / "llama3_8b.json")}
    assert warnings(warn_high_learning_rate, model=big, optim={"lr": 2e-4}) == [
        "optim.lr=0.0002 (model=tiny's: choose a model preset, e.g. model=llama3_8b, or set optim.lr) for full-weight "
        "DPO of a 8.0B-parameter model: TRL's DPO default is 1e-6, Llama DPO recipes use 5e-7 to 5e-6 and SFT 1e-5 "
        "to 2e-5; this rate is likely to wreck the model"
    ]
    assert warnings(warn_high_learning_rate, model=big, optim={"lr": 5e-7}) == []
    assert warnings(warn_high_learning_rate, model={**big, "lora": {"r": 16}}, optim={"lr": 2e-4}) == []  # LoRA's usual rates
    assert warnings(warn_high_learning_rate, optim={"lr": 2e-4}) == []  # the bundled tiny model
