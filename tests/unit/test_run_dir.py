"""A run directory keeps its settings: training into one that holds a run trained otherwise is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_dist.config import ConfigError, config_from_dict
from dpo_dist.runinfo import check_same_run, write_config
from tests.helpers import run_cli


def config(out, **sections):
    return config_from_dict({"output_dir": str(out), **sections})


def test_a_run_directory_refuses_other_training_settings(tmp_path):
    out = tmp_path / "run"
    write_config(config(out, loss={"beta": 0.1}, optim={"lr": 1e-3}))
    check_same_run(config(out, loss={"beta": 0.5}))  # only config.yaml: nothing trained there yet
    (out / "metrics.jsonl").write_text("")
    check_same_run(config(out, loss={"beta": 0.1}, optim={"lr": 1e-3}))  # the same run: resume it
    # How and where it runs may change between its jobs.
    check_same_run(config(out, loss={"beta": 0.1}, optim={"lr": 1e-3}, cluster={"nproc_per_node": 2}, train={"eval_every": 5}, reference={"mode": "online"}))
    with pytest.raises(ConfigError) as info:
        check_same_run(config(out, loss={"beta": 0.5}, optim={"lr": 5e-4}))
    message = str(info.value)
    assert message.startswith(f"output_dir={out} holds a run trained with other settings (loss.beta: 0.1 -> 0.5; optim.lr: 0.001 -> 0.0005)")
    assert message.endswith("resume it with its own settings, or train into a new output_dir")
    with pytest.raises(ConfigError, match=r"train.max_steps: 120 -> 60"):
        check_same_run(config(out, loss={"beta": 0.1}, optim={"lr": 1e-3}, train={"max_steps": 60}))
    check_same_run(config(out, loss={"beta": 0.1}, optim={"lr": 1e-3}, train={"max_steps": 400}))  # train longer
    # A moving reference (TR-DPO) is what the run trains against, not how it runs.
    with pytest.raises(ConfigError, match=r"reference.sync_every: 0 -> 4"):
        check_same_run(config(out, loss={"beta": 0.1}, optim={"lr": 1e-3}, reference={"mode": "online", "sync_every": 4}))


def test_dpo_train_into_a_run_with_other_settings_is_one_line(tmp_path):
    """A sweep re-run into the same output_dir with new values (points are numbered, not named by
    their values) would otherwise call each point finished and relabel the old models."""
    out = tmp_path / "run"
    written = run_cli("slurm.write_config", f"output_dir={out}")  # the config dpo-train composes, nothing run
    assert written.returncode == 0, written.stderr
    (out / "final").mkdir()
    result = run_cli("launch.train", f"output_dir={out}", "loss.beta=0.3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"dpo-train: error: output_dir={out} holds a run trained with other settings (loss.beta: 0.1 -> 0.3): "
        "resume it with its own settings, or train into a new output_dir"
    )
    assert "beta: 0.1" in (out / "config.yaml").read_text()  # left as it was


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("launch.train", ["loss.beta=0.1,0.2"], "dpo-train: error: loss.beta=0.1,0.2 is a sweep (several values): add -m to run one job per value"),
        ("launch.train", ["output_dir="], "dpo-train: error: output_dir is empty: give the run a directory (it would train into the current one)"),
        ("launch.precompute", ["experiment=sft_then_dpo"], "dpo-precompute: error: sft_first: the DPO stage's reference is the SFT stage's export"),
    ],
)
def test_launch_refusals_are_one_line(module, args, message):
    result = run_cli(module, *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_cli("launch.train", f"output_dir={tmp_path / 'file'}")
    message = f"dpo-train: error: output_dir={tmp_path / 'file'}: exists and is not a directory"
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


def test_a_partial_last_metrics_row_does_not_block_the_resume(tmp_path):
    """A writer that died mid-row leaves half a line at the end: it is past the last checkpoint
    (the resume writes it again) and is dropped; a damaged row anywhere else still fails."""
    from dpo_dist.runinfo import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.6}\n')
    with pytest.raises(ValueError):
        read_metrics(path)


def test_a_later_job_keeps_reference_computed(tmp_path):
    """A job requeued before its first checkpoint reuses the cache its first job computed: the run
    computed it (run_info.json), though this job did not."""
    import json

    from dpo_dist.runinfo import write_run_info

    reference = {"cache_dir": "/c", "computed": True, "mode": "precompute"}
    write_run_info(tmp_path, {"resumed_from_step": 0, "reference": reference})
    write_run_info(tmp_path, {"resumed_from_step": 0, "reference": {**reference, "computed": False}})
    assert json.loads((tmp_path / "run_info.json").read_text())["reference"]["computed"] is True
    write_run_info(tmp_path, {"resumed_from_step": 0, "reference": {**reference, "cache_dir": "/other", "computed": False}})
    assert json.loads((tmp_path / "run_info.json").read_text())["reference"]["computed"] is False


def test_the_ranks_that_wrote_a_zero_checkpoint_are_counted(tmp_path):
    """ZeRO 1-3 checkpoints are partitioned per rank (another world size resumes through a universal
    checkpoint, tests/integration/test_engine.py); stage 0's single file resumes on any."""
    from dpo_dist.checkpoint import checkpoint_world

    assert checkpoint_world(tmp_path, config_from_dict({})) is None
    for rank in range(2):
        (tmp_path / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint_world(tmp_path, config_from_dict({})) == 2
    assert checkpoint_world(tmp_path, config_from_dict({"deepspeed": {"stage": 0}})) is None


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2", "SIGTERM"])
def test_a_stop_signal_before_training_exits_75(tmp_path, monkeypatch, name):
    """A rank signalled before training installs its preemption flag (loading, the reference pass)
    has nothing to checkpoint: it exits 75 (requeue me), not killed by the signal (143)."""
    import os
    import signal

    from dpo_dist import worker

    path = write_config(config(tmp_path / "run"))
    monkeypatch.setattr(worker, "run_task", lambda cfg, task: os.kill(os.getpid(), getattr(signal, name)))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        assert worker.main([str(path), "train"]) == worker.PREEMPTED_EXIT_CODE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_paths_named_relative_or_absolute_are_the_same_run(tmp_path, monkeypatch):
    """An sft_first chain builds the DPO stage's model.path from output_dir: runs/x/sft/final and
    $PWD/runs/x/sft/final are the same file, not other settings."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    write_config(config(out, model={"path": "models/base"}))
    (out / "metrics.jsonl").write_text("")
    check_same_run(config(out, model={"path": str(tmp_path / "models" / "base")}))
    with pytest.raises(ConfigError, match="model.path"):
        check_same_run(config(out, model={"path": str(tmp_path / "models" / "other")}))


def test_a_second_job_into_a_held_output_dir_is_refused(tmp_path, monkeypatch):
    import threading
    import time

    from dpo_dist.runinfo import RunLock

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert message.startswith(f"output_dir={tmp_path} is in use by another training job (host ")
    assert "let it finish (or stop it), or train into another output_dir" in message and "\n" not in message
    first.release()
    RunLock(tmp_path).acquire().release()  # free again once released (or its process died)

    # A requeued Slurm job waits out its own previous run's lock (the same job id), not a stranger's.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    previous = RunLock(tmp_path).acquire()
    threading.Timer(0.3, previous.release).start()
    t0 = time.monotonic()
    RunLock(tmp_path, poll_s=0.05).acquire().release()
    assert time.monotonic() - t0 >= 0.25
    held = RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ConfigError, match="Slurm job 77"):
        RunLock(tmp_path, poll_s=0.05).acquire()
    held.release()


def test_dpo_train_into_an_output_dir_another_job_holds_is_one_line(tmp_path, monkeypatch):
    from dpo_dist.runinfo import RunLock

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = tmp_path / "run"
    settings = ["train.max_steps=1", "wandb.mode=disabled"]
    # The running job's files: the refused job must not rewrite them (config.yaml is what
    # dpo-eval/export/report trust; .rank_errors carries the running ranks' error lines).
    write_config(config(out, train={"max_steps": 1}, wandb={"mode": "disabled"}))
    with open(out / "config.yaml", "a") as f:
        f.write("# the running job's\n")
    (out / ".rank_errors").mkdir()
    (out / ".rank_errors" / "rank0").write_text("x")
    with RunLock(out):
        result = run_cli("launch.train", f"output_dir={out}", *settings)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert any(f"output_dir={out} is in use by another training job" in ln for ln in lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "[rank" not in result.stderr  # refused before any rank
    assert (out / "config.yaml").read_text().endswith("# the running job's\n")
    assert (out / ".rank_errors" / "rank0").read_text() == "x"
    assert not (out / ".hydra").exists() and not (out / "dpo-train.log").exists()  # refused before Hydra ran


def test_a_finished_run_without_a_checkpoint_cannot_train_longer(tmp_path):
    """Growing train.max_steps resumes from the newest checkpoint (the last step gets one); with
    none (checkpoint_every=0), training would start again at step 0 over the finished run."""
    out = tmp_path / "run"
    write_config(config(out, train={"max_steps": 20, "checkpoint_every": 0}))
    (out / "final").mkdir()
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError) as info:
        check_same_run(config(out, train={"max_steps": 25, "checkpoint_every": 0}))
    assert str(info.value) == (
        f"output_dir={out} holds a finished 20-step run with no checkpoint to go on from (train.checkpoint_every=0): "
        f"train longer into a new output_dir (e.g. with model.path={out / 'final'})"
    )
    check_same_run(config(out, train={"max_steps": 20, "checkpoint_every": 0}))  # the same run: finished, returns
    (out / "checkpoints" / "step_00000020").mkdir(parents=True)
    (out / "checkpoints" / "step_00000020" / "COMPLETE").write_text("20\n")
    check_same_run(config(out, train={"max_steps": 25, "checkpoint_every": 0}))  # goes on from step 20


def test_a_claim_is_taken_once_per_process_and_remembers_a_refusal(tmp_path, monkeypatch):
    """A Slurm rank 0 claims output_dir before writing anything, train() claims it again: the same
    lock; a refusal stays a refusal for the job (train() raises it on every rank); the ranks a
    local launcher starts find it held by that launcher (RUN_LOCK_ENV)."""
    import os

    from dpo_dist.runinfo import RUN_LOCK_ENV, RunDirInUse, RunLock, claim_run_dir, release_run_dir

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    mine = claim_run_dir(tmp_path / "a")
    assert mine is not None and claim_run_dir(tmp_path / "a") is mine
    release_run_dir(tmp_path / "a")
    RunLock(tmp_path / "a").acquire().release()  # released

    other = RunLock(tmp_path / "b").acquire()
    with pytest.raises(RunDirInUse):
        claim_run_dir(tmp_path / "b")
    other.release()
    with pytest.raises(RunDirInUse):  # remembered: this job was refused
        claim_run_dir(tmp_path / "b")
    release_run_dir(tmp_path / "b")

    monkeypatch.setenv(RUN_LOCK_ENV, os.path.realpath(tmp_path / "c"))
    held_by_launcher = RunLock(tmp_path / "c").acquire()
    assert claim_run_dir(tmp_path / "c") is None
    held_by_launcher.release()


def test_a_tr_dpo_resume_finds_its_moved_reference_or_refuses(tmp_path):
    """A checkpoint past the first sync must hold the moved reference: without it the run would
    silently score against model.path again (not exact); before the first sync none is needed."""
    from dpo_dist import checkpoint as C
    from dpo_dist.distributed import DistEnv

    cfg = config(tmp_path, reference={"mode": "online", "sync_every": 2})
    env = DistEnv(0, 0, 1, "127.0.0.1", 0, None)
    step1 = tmp_path / "checkpoints" / "step_00000001"
    step1.mkdir(parents=True)
    (step1 / "COMPLETE").write_text("1\n")
    assert C.moved_reference_path(cfg, env) is None  # not moved yet
    step3 = tmp_path / "checkpoints" / "step_00000003"
    step3.mkdir()
    (step3 / "COMPLETE").write_text("3\n")
    with pytest.raises(ConfigError, match=r"step_00000003 has no reference/: the reference moved at step 2"):
        C.moved_reference_path(cfg, env)
    (step3 / "reference").mkdir()
    assert C.moved_reference_path(cfg, env) == str(step3 / "reference")


def test_an_sft_first_chain_cannot_grow_its_sft_stage_under_a_trained_dpo_stage(tmp_path):
    """The DPO stage's own settings (model.path=sft/final) do not change when sft_first.max_steps
    grows, so only this check stops a longer SFT run from replacing the model under a DPO stage
    that trained from the old one (it would then be called finished)."""
    from dpo_dist.runinfo import check_sft_chain

    out = tmp_path / "chain"
    sft, dpo = config(out, sft_first={"max_steps": 3}).stages()
    write_config(sft)
    (out / "sft" / "metrics.jsonl").write_text("")
    longer_sft, longer_dpo = config(out, sft_first={"max_steps": 5}).stages()
    check_same_run(longer_sft)  # the SFT stage alone may train longer
    check_sft_chain(longer_sft, longer_dpo)  # DPO has not started yet: nothing trained from sft/final
    write_config(dpo)
    check_sft_chain(longer_sft, longer_dpo)  # a DPO config.yaml alone: still nothing trained
    (out / "final").mkdir()
    check_same_run(longer_dpo)  # blind to it: the DPO stage's settings are the same
    check_sft_chain(sft, dpo)  # the same chain again (a resume or a re-run) is fine
    with pytest.raises(ConfigError) as info:
        check_sft_chain(longer_sft, longer_dpo)
    assert str(info.value) == (
        f"output_dir={out}: its DPO stage trained from the 3-step SFT stage in {out / 'sft'}; sft_first.max_steps=5 "
        "would replace that model under it: train the longer chain into a new output_dir"
    )



def test_dpo_train_growing_the_sft_stage_of_a_trained_chain_is_one_line(tmp_path):
    import yaml

    out = tmp_path / "chain"
    written = run_cli("slurm.write_config", f"output_dir={out}", "sft_first.max_steps=3")  # dpo-train's config
    assert written.returncode == 0, written.stderr
    for stage in config_from_dict(yaml.safe_load((out / "config.yaml").read_text())).stages():
        write_config(stage)
        (Path(stage.output_dir) / "checkpoints" / "step_3").mkdir(parents=True)  # finished, and can go on
        (Path(stage.output_dir) / "checkpoints" / "step_3" / "COMPLETE").touch()
        (Path(stage.output_dir) / "final").mkdir()
    result = run_cli("launch.train", f"output_dir={out}", "sft_first.max_steps=5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"dpo-train: error: output_dir={out}: its DPO stage trained from the 3-step SFT stage in {out / 'sft'}; "
        "sft_first.max_steps=5 would replace that model under it: train the longer chain into a new output_dir"
    )


def test_a_run_by_epochs_may_train_more_epochs_not_fewer(tmp_path):
    out = tmp_path / "run"
    write_config(config(out, train={"epochs": 1.0}))
    (out / "metrics.jsonl").write_text("")
    check_same_run(config(out, train={"epochs": 2.0}))  # train longer
    check_same_run(config(out, train={"epochs": 1.0, "max_steps": 7}))  # max_steps is not used with epochs
    with pytest.raises(ConfigError, match=r"train.epochs: 1.0 -> 0.5"):
        check_same_run(config(out, train={"epochs": 0.5}))
    with pytest.raises(ConfigError, match=r"train.epochs: 1.0 -> None"):
        check_same_run(config(out, train={"max_steps": 400}))  # from epochs to steps: another run
