"""``cluster=local`` plumbing without training: sweep run directories, the launcher's exit status,
which rank's failure it reports, and preemption signals passed on to the ranks (fake ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpo_dist.launcher import LaunchError, _wait_all, forward_signals
from dpo_dist.report import find_run_dirs
from launch.run import launch
from tests.helpers import REPO

# A Hydra app that only prints where each run would write.
SHOW_DIRS = """
from hydra.core.hydra_config import HydraConfig
from launch.common import hydra_main

def task(cfg):
    print("RUN", cfg.output_dir, HydraConfig.get().runtime.output_dir, flush=True)

hydra_main("dpo-train", task)
"""


def run_dirs(*args: str) -> list[tuple[Path, Path]]:
    result = subprocess.run([sys.executable, "-c", SHOW_DIRS, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln.split()[1:] for ln in result.stdout.splitlines() if ln.startswith("RUN ")]
    return [(Path(a).resolve(), Path(b).resolve()) for a, b in lines]


def test_an_explicit_output_dir_is_the_sweep_directory(tmp_path):
    """Given to every point as is, output_dir=X made the second point resume the first's run."""
    sweep = tmp_path / "sweep"
    runs = run_dirs("-m", "loss.beta=0.1,0.2", f"output_dir={sweep}")
    assert runs == [(sweep / "0", sweep / "0"), (sweep / "1", sweep / "1")]
    assert find_run_dirs(sweep) == [sweep / "0", sweep / "1"]  # what dpo-report tabulates
    for n, beta in enumerate(("0.1", "0.2")):
        assert yaml.safe_load((sweep / str(n) / ".hydra" / "overrides.yaml").read_text()) == [f"loss.beta={beta}"]
    single = tmp_path / "single"
    assert run_dirs(f"output_dir={single}") == [(single, single)]  # a single run: X itself


# ----------------------------------------------------------------------------- exit status


@pytest.mark.parametrize(
    "status, expected",
    [(1, 1), (-9, 128 + 9), (75, 75), (2, 2)],
)
def test_local_launch_exits_with_the_ranks_status(monkeypatch, capsys, tmp_path, status, expected):
    """Only a user error is 2: a crash (1), an OOM kill (-9) and a preemption (75) keep their own."""
    import dpo_dist.launcher
    from dpo_dist.config import config_from_dict

    def failing(cfg, task):
        raise LaunchError(f"rank 1 exited with status {status}", status)

    monkeypatch.setattr(dpo_dist.launcher, "run_local", failing)
    cfg = config_from_dict({"output_dir": str(tmp_path / "run")})
    if status == 2:  # a user error goes up to hydra_main, which prints it and exits 2
        from launch.common import UserError

        with pytest.raises(UserError, match="rank 1 exited with status 2"):
            launch("dpo-train", cfg, "train")
        return
    with pytest.raises(SystemExit) as exited:
        launch("dpo-train", cfg, "train")
    assert exited.value.code == expected
    assert capsys.readouterr().err == f"dpo-train: error: rank 1 exited with status {status}\n"


def test_bad_data_stops_a_slurm_submission_before_the_job_is_queued(monkeypatch, tmp_path):
    """data.on_invalid=error: a bad record is one line on the login node, not a job that waited
    for its allocation; skip (or good data) submits."""
    import slurm.submit
    from dpo_dist.config import config_from_dict
    from launch.common import UserError

    submitted = []
    monkeypatch.setattr(slurm.submit, "submit_and_wait", lambda cfg, task: submitted.append(task))
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": "4"}\n')

    def cfg(eval_path, on_invalid="error"):
        data = {"train_path": str(good), "eval_path": str(eval_path), "on_invalid": on_invalid}
        return config_from_dict({"output_dir": str(tmp_path / "run"), "cluster": {"name": "slurm"}, "data": data})

    with pytest.raises(UserError, match=rf"^{bad}: 1 invalid record \(first: {bad}:2: missing key 'rejected'\)"):
        launch("dpo-train", cfg(bad), "train")
    assert submitted == []
    launch("dpo-train", cfg(bad, on_invalid="skip"), "train")
    launch("dpo-train", cfg(good), "train")
    assert submitted == ["train", "train"]


# ----------------------------------------------------------------------------- which rank failed


def fake_rank(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import signal, sys, time\n{code}"])


def test_a_user_error_wins_over_a_peer_seen_failing_in_the_same_poll():
    procs = [fake_rank("sys.exit(1)"), fake_rank("sys.exit(2)")]
    for p in procs:
        p.wait()
    with pytest.raises(LaunchError) as failed:
        _wait_all(procs)
    assert failed.value.status == 2 and str(failed.value).startswith("rank 1 ")


def test_a_user_error_wins_over_a_peer_that_failed_first():
    """Rank 1 stops on bad input; rank 0 dies of the broken collective before rank 1 has exited."""
    procs = [
        fake_rank("time.sleep(2); sys.exit(1)"),
        fake_rank("signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(4); sys.exit(2)"),
    ]
    with pytest.raises(LaunchError) as failed:
        _wait_all(procs)
    assert failed.value.status == 2 and str(failed.value).startswith("rank 1 ")


def test_the_first_failure_is_reported_and_the_others_stopped():
    procs = [fake_rank("time.sleep(60)"), fake_rank("sys.exit(3)")]
    with pytest.raises(LaunchError) as failed:
        _wait_all(procs)
    assert failed.value.status == 3 and str(failed.value).startswith("rank 1 exited with status 3")
    assert procs[0].returncode == -signal.SIGTERM


# ----------------------------------------------------------------------------- preemption

# Like a training rank: a preemption signal sets a flag; the rank then "checkpoints" (rank 1
# more slowly than rank 0) and exits 75.
PREEMPTIBLE_RANK = """
import pathlib
flag = []
for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(sig, lambda *_: flag.append(1))
ready, saved, seconds = sys.argv[1:]
pathlib.Path(ready).touch()
while not flag:
    time.sleep(0.05)
time.sleep(float(seconds))
pathlib.Path(saved).touch()
sys.exit(75)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_a_preemption_signal_reaches_the_ranks_and_the_launcher_waits(tmp_path, sig):
    procs: list[subprocess.Popen] = []
    before = signal.getsignal(sig)
    with forward_signals(procs):
        for rank, seconds in enumerate(("0.1", "1.5")):
            files = [str(tmp_path / f"{name}{rank}") for name in ("ready", "saved")]
            procs.append(subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n" + PREEMPTIBLE_RANK, *files, seconds]))
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        os.kill(os.getpid(), sig)  # to "the launcher": this process, inside forward_signals
        with pytest.raises(LaunchError) as stopped:
            _wait_all(procs)
    assert stopped.value.status == 75 and "preempted" in str(stopped.value)
    assert [p.returncode for p in procs] == [75, 75]
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()
    assert signal.getsignal(sig) == before  # restored


# ----------------------------------------------------------------------------- GPUs and port


class FakeRank:
    """A rank that has already finished (status 0), recording the environment it was given."""

    def __init__(self, cmd, env, **_kwargs):
        self.env, self.returncode = env, 0

    def poll(self):
        return 0


@pytest.fixture
def fake_ranks(monkeypatch):
    """subprocess.Popen of the launcher replaced: the rank environments it would have started."""
    started: list[dict] = []

    def popen(cmd, env, **kwargs):
        started.append(env)
        return FakeRank(cmd, env, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    return started


def local_config(tmp_path, **cluster):
    from dpo_dist.config import config_from_dict

    return config_from_dict({"output_dir": str(tmp_path / "run"), "cluster": {"name": "local", **cluster}})


def fake_gpus(monkeypatch, count: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_more_local_ranks_than_gpus_is_refused_before_any_rank_starts(monkeypatch, tmp_path, fake_ranks):
    """4 ranks on 2 GPUs wrapped around (LOCAL_RANK % 2): two ranks per GPU, without a word."""
    from launch.common import UserError

    fake_gpus(monkeypatch, 2)
    cfg = local_config(tmp_path, nproc_per_node=4)
    with pytest.raises(UserError) as refused:  # hydra_main prints it as `dpo-train: error: ...`, exit 2
        launch("dpo-train", cfg, "train")
    assert str(refused.value) == (
        "cluster.nproc_per_node=4 but this machine has 2 visible CUDA GPU(s): ranks would share GPUs; "
        "set cluster.nproc_per_node to at most 2 (CUDA_VISIBLE_DEVICES= runs the ranks on the CPU)"
    )
    assert fake_ranks == [] and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("gpus, nproc", [(2, 2), (8, 3), (0, 4)])
def test_one_rank_per_gpu_or_any_number_on_cpu_starts(monkeypatch, tmp_path, fake_ranks, gpus, nproc):
    fake_gpus(monkeypatch, gpus)
    launch("dpo-train", local_config(tmp_path, nproc_per_node=nproc), "train")
    assert [env["LOCAL_RANK"] for env in fake_ranks] == [str(r) for r in range(nproc)]


def unused_port() -> int:
    """A free port below Linux's ephemeral range, so that free_port() cannot hand out the same."""
    import socket

    for port in range(23456, 32000, 7):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port found in 23456-32000")


def test_a_set_master_port_is_the_local_rendezvous(monkeypatch, tmp_path, fake_ranks):
    """cluster.master_port ("rendezvous port of rank 0") was ignored for cluster=local: a free port
    was used instead."""
    fake_gpus(monkeypatch, 0)
    port = unused_port()
    launch("dpo-train", local_config(tmp_path, nproc_per_node=2, master_port=port), "train")
    assert [env["MASTER_PORT"] for env in fake_ranks] == [str(port)] * 2


def test_an_unset_master_port_picks_a_free_one(monkeypatch, tmp_path, fake_ranks):
    import dpo_dist.launcher

    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(dpo_dist.launcher, "free_port", lambda: 40123)
    cfg = local_config(tmp_path, nproc_per_node=2)
    assert cfg.cluster.master_port is None  # the default: local runs side by side never collide
    launch("dpo-train", cfg, "train")
    assert [env["MASTER_PORT"] for env in fake_ranks] == ["40123"] * 2


def test_a_taken_master_port_is_refused_before_any_rank_starts(monkeypatch, tmp_path, fake_ranks):
    import socket

    from launch.common import UserError

    fake_gpus(monkeypatch, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"^cluster\.master_port={port}: cannot listen on 127\.0\.0\.1:{port} "):
            launch("dpo-train", local_config(tmp_path, nproc_per_node=2, master_port=port), "train")
    assert fake_ranks == []


def test_master_port_values():
    from dpo_dist.config import ClusterConfig, ConfigError

    assert ClusterConfig().master_port is None
    assert ClusterConfig(master_port=65535).master_port == 65535
    with pytest.raises(ConfigError, match=r"^cluster\.master_port: must be between 1 and 65535 for cluster=local \(or null\), got 0$"):
        ClusterConfig(master_port=0)
