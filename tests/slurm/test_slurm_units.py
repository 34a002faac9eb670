"""The Slurm pieces that need no cluster: rank setup from Slurm variables, the submitit/Hydra
parameter mapping, the requeue decision, status.json, and the sweep report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from dpo_dist import distributed as D
from dpo_dist.config import ClusterConfig, ConfigError
from dpo_dist.report import describe_runs, format_table, heatmap_grid, load_run, load_sweep, plot, table
from slurm import runtime
from slurm.submit import SlurmSubmitFailed, executor_parameters, launcher_overrides, require_slurm_commands
from tests.helpers import run_cli

SLURM_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_STEP_ID",
              "SLURM_STEPID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST",
              "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
              "SLURM_RESTART_COUNT")


@pytest.fixture
def slurm_task(monkeypatch):
    """The variables of task 1 (node 2, local 0) of a 2-task srun step of job 1234."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost,other")
    return monkeypatch


@pytest.mark.parametrize(
    "nodelist, first",
    [("n1", "n1"), ("n[1-2]", "n1"), ("gpu[003-010,12],cpu1", "gpu003"), ("a1,b[2-3]", "a1"),
     ("rack[4,7]-node[01-04]", "rack4-node01")],
)
def test_first_node(nodelist, first):
    assert D.first_node(nodelist) == first


def test_slurm_env_from_srun_task(slurm_task):
    env = D.detect_env()
    assert (env.rank, env.local_rank, env.world_size) == (1, 0, 2)
    assert env.master_addr == "localhost"  # the first node, which resolves
    assert env.master_port == 29500 + (16 * 1234 + 0) % 1000
    assert env.slurm_job_id == "1234"
    assert D.slurm_env(base_port=40000).master_port == 40744


def test_a_step_over_part_of_the_job_meets_on_its_own_first_node(slurm_task):
    """`srun -N1 -w other` in a 2-node job: rank 0 runs on `other`, not on the job's first node."""
    slurm_task.setenv("SLURM_JOB_NODELIST", "nosuchnode-dpo1,localhost")
    slurm_task.setenv("SLURM_STEP_NODELIST", "localhost")
    assert D.slurm_env().master_addr == "localhost"


def test_concurrent_steps_and_nearby_jobs_get_distinct_ports(slurm_task):
    ports = {}
    for job in range(1234, 1234 + 62):
        for step in range(16):
            slurm_task.setenv("SLURM_JOB_ID", str(job))
            slurm_task.setenv("SLURM_STEP_ID", str(step))
            ports[job, step] = D.slurm_env().master_port
    assert len(set(ports.values())) == len(ports)
    assert all(29500 <= port < 30500 for port in ports.values())


def test_a_task_bound_to_one_gpu_uses_its_device_0(slurm_task):
    """--gpus-per-task=1: task 3 of a node sees one GPU; set_device(3) would fail."""
    import torch

    slurm_task.setenv("SLURM_LOCALID", "3")
    slurm_task.setattr(torch.cuda, "device_count", lambda: 1)
    env = D.slurm_env()
    assert env.local_rank == 0  # exported as LOCAL_RANK, which DeepSpeed passes to set_device
    chosen = []
    slurm_task.setattr(torch.cuda, "is_available", lambda: True)
    slurm_task.setattr(torch.cuda, "set_device", chosen.append)
    # The rank's device comes from that LOCAL_RANK; device_for itself never wraps around (a
    # local rank 3 with one GPU would share it: tests/unit/test_distributed.py).
    assert D.device_for(env) == torch.device("cuda", 0) and chosen == [0]
    slurm_task.setattr(torch.cuda, "device_count", lambda: 4)  # all of the node's GPUs visible
    assert D.slurm_env().local_rank == 3


def test_an_unset_master_port_is_the_slurm_base_port(slurm_task):
    """cluster.master_port null (its default; cluster=local then picks a free port) is 29500 here."""
    assert ClusterConfig(name="slurm").master_port is None
    assert D.slurm_env(ClusterConfig(name="slurm").master_port).master_port == 29500 + (16 * 1234 + 0) % 1000
    with pytest.raises(ConfigError, match=r"^cluster\.master_port: must be between 1 and 64536 for cluster=slurm"):
        ClusterConfig(name="slurm", master_port=65000)  # + up to 999 would not be a port


def test_exported_torchrun_variables_win(slurm_task):
    slurm_task.setenv("MASTER_ADDR", "10.0.0.7")
    slurm_task.setenv("MASTER_PORT", "1111")
    env = D.export_slurm_env(29500)
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 1111)
    assert (D.detect_env().rank, D.detect_env().world_size) == (1, 2)  # now read from RANK/WORLD_SIZE


def test_batch_script_is_not_a_rank(slurm_task):
    slurm_task.delenv("SLURM_STEP_ID")
    assert not D.in_slurm_step()
    env = D.detect_env()
    assert (env.rank, env.world_size) == (0, 1)
    assert D.export_slurm_env(29500) is None


def test_unresolvable_node_uses_slurm_node_addr(slurm_task, caplog):
    slurm_task.setenv("SLURM_JOB_NODELIST", "nosuchnode-dpo[1-2]")
    slurm_task.setattr(D, "_slurm_node_addr", lambda node: {"nosuchnode-dpo1": "127.0.0.1"}[node])
    with caplog.at_level("WARNING"):
        assert D.slurm_master_addr() == "127.0.0.1"
    assert "does not resolve" in caplog.text


def test_array_job_id(slurm_task):
    slurm_task.setenv("SLURM_ARRAY_JOB_ID", "77")
    slurm_task.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert D.detect_env().slurm_job_id == "77_3"


def test_executor_parameters():
    cluster = ClusterConfig(name="slurm", nodes=2, tasks_per_node=8, gpus_per_node=8, cpus_per_task=4, time=600,
                            partition="gpu", mem_gb=0, additional_parameters={"exclusive": True})
    params = executor_parameters(cluster, "dpo-train")
    assert (params["nodes"], params["ntasks_per_node"], params["cpus_per_task"]) == (2, 8, 4)
    assert params["gpus_per_node"] == 8 and params["partition"] == "gpu" and params["time"] == 600
    assert "mem" not in params  # 0 = partition default; sbatch --mem=0 would mean "all of it"
    assert params["signal_delay_s"] == 120
    assert params["additional_parameters"] == {"requeue": True, "exclusive": True}
    assert "export SLURM_KILL_BAD_EXIT=1" in params["setup"]
    short = executor_parameters(ClusterConfig(name="slurm", time=2, mem_gb=1.5), "x")
    assert short["signal_delay_s"] == 30 and short["mem"] == "1536M" and "gpus_per_node" not in short
    patient = executor_parameters(ClusterConfig(name="slurm", time=600, signal_delay_s=300), "x")
    assert patient["signal_delay_s"] == 300
    assert "partition" not in short


def test_launcher_overrides_parse_back():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cluster = ClusterConfig(name="slurm", nodes=2, constraint="a100&ib", max_requeues=5,
                            additional_parameters={"mail-user": "me@lab.org"})
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(launcher_overrides(cluster))}
    assert parsed["hydra.launcher.nodes"] == 2
    assert parsed["hydra.launcher.timeout_min"] == 60
    assert parsed["hydra.launcher.constraint"] == "a100&ib"
    assert parsed["hydra.launcher.max_num_timeout"] == 5
    assert parsed["hydra.launcher.additional_parameters"] == {"requeue": True, "mail-user": "me@lab.org"}
    assert parsed["hydra.launcher.setup"] == ["export SLURM_KILL_BAD_EXIT=1"]


def test_requeue_budget_and_state(monkeypatch):
    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setattr(runtime, "requeue", lambda job: calls.append(job))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setattr(runtime, "job_state", lambda job: pytest.fail("budget spent: no need to ask"))
    requeued, why = runtime.request_requeue(3)
    assert not requeued and "cluster.max_requeues=3" in why and calls == []
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setattr(runtime, "job_state", lambda job: "CANCELLED")
    requeued, why = runtime.request_requeue(3)
    assert not requeued and "CANCELLED" in why and calls == []
    monkeypatch.setattr(runtime, "job_state", lambda job: "RUNNING")
    assert runtime.request_requeue(3) == (True, "requeued (restart 2 of at most 3)") and calls == ["9"]


def test_status_keeps_the_first_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    runtime.RunStatus(tmp_path, 0, "5").write("running")
    runtime.RunStatus(tmp_path, 1, "5").write("failed", "rank 1: the cause")
    runtime.RunStatus(tmp_path, 0, "5").write("failed", "rank 0: connection closed by peer")
    record = runtime.read_status(tmp_path)
    assert (record["state"], record["message"], record["rank"]) == ("failed", "rank 1: the cause", 1)
    runtime.RunStatus(tmp_path, 0, "6").write("running")  # a new job in the same directory
    assert runtime.read_status(tmp_path)["state"] == "running"


# ----------------------------------------------------------------------------- failed submission

SBATCH_REFUSES = """#!/bin/sh
echo "sbatch: error: invalid partition specified: nope" >&2
echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
exit 1
"""


@pytest.fixture
def refusing_sbatch(tmp_path):
    """PATH with an ``sbatch`` that refuses every job as a real one does (and an ``srun``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH_REFUSES), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _only_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_refused_submission_is_one_line_exit_1(tmp_path, refusing_sbatch):
    result = run_cli("launch.train", "cluster=slurm", "train.max_steps=1", f"output_dir={tmp_path / 'run'}",
                     env=refusing_sbatch, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert _only_line(result.stderr) == (
        "dpo-train: error: Slurm submission failed: sbatch: error: invalid partition specified: nope"
    )


def test_refused_sweep_submission_is_one_line_exit_1(tmp_path, refusing_sbatch):
    result = run_cli("launch.train", "-m", "cluster=slurm", "train.max_steps=1", "loss.beta=0.1,0.2",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", env=refusing_sbatch, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert _only_line(result.stderr) == (
        "dpo-train: error: Slurm submission failed: sbatch: error: invalid partition specified: nope"
    )


def test_sbatch_reason_and_missing_commands(monkeypatch, tmp_path):
    from slurm.submit import sbatch_error_line

    no_config = ("sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
                 "sbatch: error: fetch_config: DNS SRV lookup failed\n"
                 "sbatch: fatal: Could not establish a configuration source\n")
    assert sbatch_error_line(no_config) == "sbatch: fatal: Could not establish a configuration source"
    assert sbatch_error_line("\nsbatch: error: Invalid account\nmore\n") == "sbatch: error: Invalid account"
    assert sbatch_error_line("") == "sbatch failed without a message"
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmSubmitFailed, match="no sbatch or srun on PATH"):
        require_slurm_commands()


# ----------------------------------------------------------------------------- plain sbatch

SBATCH_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "dpo_train.sbatch"

# Stand-ins for the Slurm commands the batch script calls: srun "runs the ranks" (exit status
# FAKE_SRUN_STATUS, 75 = preempted after a checkpoint), scontrol reports the job RUNNING and
# records a requeue.
FAKE_SRUN = '#!/bin/sh\necho "$@" >> "$FAKE_LOG.srun"\nexit "${FAKE_SRUN_STATUS:-0}"\n'
FAKE_SCONTROL = """#!/bin/sh
case "$1" in
  show) echo "JobId=$3 JobName=dpo-train JobState=RUNNING Reason=None" ;;
  requeue) echo "$2" >> "$FAKE_LOG.requeue" ;;
esac
"""


def write_run_config(tmp_path, *overrides: str) -> tuple[Path, list[str]]:
    """``python -m slurm.write_config output_dir=RUN overrides``: (RUN, the lines it printed)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "slurm.write_config", f"output_dir={run}", *overrides],
                            cwd=SBATCH_SCRIPT.parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result.stdout.splitlines()


def run_batch_script(tmp_path, exported: dict[str, str], *, restarts: int, srun_status: int = 75):
    """The batch script of job 42 (requeued ``restarts`` times) with ``exported`` as sbatch
    --export gave it: (exit status, stderr, srun was called, requeued); its stdout in ``last_stdout``."""
    import subprocess
    import sys
    import tempfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = Path(tempfile.mkdtemp(dir=tmp_path)) / "calls"  # this call's own
    env = {k: v for k, v in os.environ.items() if k not in ("MAX_REQUEUES", "SIGNAL_DELAY_S")}
    env.update(exported, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
               SLURM_JOB_ID="42", SLURM_RESTART_COUNT=str(restarts), SLURM_JOB_NODELIST="n1",
               FAKE_LOG=str(log), FAKE_SRUN_STATUS=str(srun_status))
    result = subprocess.run(["bash", str(SBATCH_SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    (tmp_path / "last_stdout").write_text(result.stdout)
    return result.returncode, result.stderr, Path(f"{log}.srun").exists(), Path(f"{log}.requeue").exists()


def submit(command: str) -> dict[str, str]:
    """The variables ``sbatch --export=ALL,K=V,...`` gives the job (checking that the command
    warns the job steps, not the batch shell, as its SIGNAL_DELAY_S says)."""
    import shlex

    words = shlex.split(command)
    assert words[0] == "sbatch" and words[-1] == str(SBATCH_SCRIPT)
    flags = dict(w.split("=", 1) for w in words[1:-1])
    exported = dict(item.split("=", 1) for item in flags["--export"].split(",")[1:])
    assert flags["--signal"] == f"USR2@{exported['SIGNAL_DELAY_S']}"  # no B: the ranks catch USR2
    return exported


def test_plain_sbatch_requeues_at_most_the_configs_max_requeues(tmp_path):
    """The script requeued at most MAX_REQUEUES (default 3) times, whatever cluster.max_requeues
    the config.yaml it runs says."""
    run, _ = write_run_config(tmp_path, "cluster.max_requeues=5")
    status, err, ran, requeued = run_batch_script(tmp_path, {"RUN_DIR": str(run)}, restarts=3)
    assert (status, ran, requeued) == (75, True, True), err  # 3 < cluster.max_requeues=5
    assert "requeueing (restart 4 of at most 5)" in err
    status, err, ran, requeued = run_batch_script(tmp_path, {"RUN_DIR": str(run)}, restarts=5)
    assert (status, ran, requeued) == (75, True, False), err
    assert "already requeued 5 time(s), at most 5 from cluster.max_requeues" in err
    # An exported MAX_REQUEUES still wins, and the log says so.
    status, err, ran, requeued = run_batch_script(tmp_path, {"RUN_DIR": str(run), "MAX_REQUEUES": "2"}, restarts=3)
    assert (status, ran, requeued) == (75, True, False), err
    assert "at most 2 from the exported MAX_REQUEUES; config.yaml has cluster.max_requeues=5" in err
    status, err, ran, _ = run_batch_script(tmp_path, {"RUN_DIR": str(run), "MAX_REQUEUES": "many"}, restarts=0)
    assert (status, ran) == (2, False) and err == "dpo-train: error: MAX_REQUEUES must be a whole number >= 0, got 'many'\n"


def test_plain_sbatch_is_warned_as_the_config_says(tmp_path):
    """The script was warned by its fixed `#SBATCH --signal=USR2@120` whatever the config's
    cluster.signal_delay_s: write_config now prints the command that passes it, and a job submitted
    without it stops at once instead of giving the checkpoint less time than configured."""
    run, printed = write_run_config(tmp_path, "cluster.signal_delay_s=300")
    assert printed == [
        str(run / "config.yaml"),
        f"sbatch --signal=USR2@300 --export=ALL,RUN_DIR={run},SIGNAL_DELAY_S=300 {SBATCH_SCRIPT}",
    ]
    status, err, ran, _ = run_batch_script(tmp_path, submit(printed[1]), restarts=0, srun_status=0)
    assert (status, ran) == (0, True), err
    assert "warned 300 s before the time limit" in (tmp_path / "last_stdout").read_text()
    status, err, ran, _ = run_batch_script(tmp_path, {"RUN_DIR": str(run)}, restarts=0)  # the #SBATCH line's 120 s
    assert (status, ran) == (2, False)
    assert err.splitlines() == [
        f"dpo-train: error: this job is warned 120 s before its time limit but {run}/config.yaml has "
        "cluster.signal_delay_s=300: submit with the sbatch command python -m slurm.write_config printed "
        "(--signal=USR2@300 and SIGNAL_DELAY_S=300)"
    ]
    status, err, ran, _ = run_batch_script(tmp_path, {"RUN_DIR": str(tmp_path / "nothing")}, restarts=0)
    assert (status, ran) == (2, False) and err.startswith("dpo-train: error: cannot read the run's config with ")
    assert len(err.splitlines()) == 1 and "nothing/config.yaml" in err


def test_write_config_refuses_a_run_dir_that_sbatch_export_would_cut(tmp_path, capsys):
    """sbatch --export splits at commas: RUN_DIR=/a,b would reach the job as /a."""
    from slurm import write_config

    with pytest.raises(SystemExit) as exited:
        write_config.main([f"output_dir='{tmp_path}/a,b'"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("python -m slurm.write_config: error: output_dir: a directory whose path has a comma")
    assert not list(tmp_path.rglob("config.yaml"))


def test_plain_sbatch_defaults_agree_with_the_config_defaults(tmp_path):
    """A config with the default cluster.signal_delay_s runs under the script's own #SBATCH line."""
    import re

    text = SBATCH_SCRIPT.read_text()
    default = ClusterConfig().signal_delay_s
    assert re.findall(r"^#SBATCH --signal=(\S+)$", text, re.M) == [f"USR2@{default}"]
    assert f'signal_delay_s="${{SIGNAL_DELAY_S:-{default}}}"' in text
    run, _ = write_run_config(tmp_path)
    status, err, ran, _ = run_batch_script(tmp_path, {"RUN_DIR": str(run)}, restarts=0, srun_status=0)
    assert (status, ran) == (0, True), err


# ----------------------------------------------------------------------------- report


def make_run(root: Path, name: str, beta: float, lr: float, *, steps: int, max_steps: int = 4, status=None,
             final: bool = False, winrate=None) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss.beta={beta}", f"optim.lr={lr}", "cluster=slurm"]))
    (run / "config.yaml").write_text(yaml.safe_dump({"loss": {"beta": beta}, "optim": {"lr": lr},
                                                     "train": {"max_steps": max_steps}}))
    rows = [{"step": s, "loss": 0.7 - 0.01 * s * beta, "tokens_per_s": 100.0 * s} for s in range(1, steps + 1)]
    if steps:
        rows[-1].update({"eval/reward_accuracy": 0.5 + beta, "eval/reward_margin": beta / 10})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    (run / "run_info.json").write_text("{}")
    if status:
        (run / "status.json").write_text(json.dumps(status))
    if final:
        (run / "final").mkdir()
        (run / "final" / "config.json").write_text("{}")
    if winrate:
        (run / "winrate.json").write_text(json.dumps(winrate))
    return run


def test_report_table_statuses_and_heatmap(tmp_path):
    make_run(tmp_path, "0", 0.1, 1e-6, steps=4, final=True, winrate={"win_rate": 0.25, "tie_rate": 0.5, "loss_rate": 0.25, "score": 0.5,
             "score_ci95": [0.2152, 0.7848], "n": 8})
    make_run(tmp_path, "1", 0.1, 5e-6, steps=2, status={"state": "failed", "job_id": "7_1", "message": "rank 1: boom"})
    make_run(tmp_path, "2", 0.5, 1e-6, steps=3, status={"state": "running", "job_id": "7_2"})
    make_run(tmp_path, "10", 0.5, 5e-6, steps=0, status={"state": "requeued", "job_id": "7_3"})
    (tmp_path / "slurm").mkdir()  # submitit's folder is not a run
    states = {"7_2": "RUNNING", "7_3": "TIMEOUT"}
    runs = load_sweep(tmp_path, scheduler_state=states.get)
    assert [r.name for r in runs] == ["0", "1", "2", "10"]
    headers, rows = table(runs)
    assert headers == ["run", "overrides", "step", "loss", "eval_acc", "eval_margin", "tokens/s", "status",
                       "win_rate", "tie_rate", "loss_rate", "win_score", "score_ci95"]
    by_name = {row[0]: dict(zip(headers, row)) for row in rows}
    assert by_name["0"]["overrides"] == "loss.beta=0.1 optim.lr=1e-06"  # cluster=slurm is common to all
    assert by_name["0"]["status"] == "done" and by_name["0"]["step"] == "4/4"
    assert by_name["0"]["eval_acc"] == "0.600" and by_name["0"]["win_rate"] == "0.250"
    assert (by_name["0"]["tie_rate"], by_name["0"]["loss_rate"]) == ("0.500", "0.250")
    assert by_name["0"]["score_ci95"] == "0.215-0.785"
    assert by_name["0"]["tokens/s"] == "250"  # median
    assert by_name["1"]["status"] == "failed" and by_name["1"]["win_rate"] == "-"
    assert by_name["2"]["status"] == "running"
    assert by_name["10"]["status"] == "timeout" and by_name["10"]["loss"] == "-"
    assert runs[1].notes == ["1: failed: rank 1: boom"]
    betas, lrs, grid, counts = heatmap_grid(runs)
    assert (betas, lrs) == ([0.1, 0.5], [1e-6, 5e-6])
    assert grid[0][0] == pytest.approx(0.6) and grid[1][0] == pytest.approx(1.0) and math.isnan(grid[1][1])
    assert counts == [[1, 1], [1, 0]]
    assert len(format_table(headers, rows).splitlines()) == 5
    png = plot(runs, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_hydra_uses_config_diff(tmp_path):
    for name, beta in (("a", 0.1), ("b", 0.2)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), "loss": {"beta": beta}, "seed": 0}))
    runs = [load_run(tmp_path / n) for n in ("a", "b")]
    describe_runs(runs)
    assert [r.label for r in runs] == ["loss.beta=0.1", "loss.beta=0.2"]
    assert [r.status for r in runs] == ["pending", "pending"]
    png = plot(runs, tmp_path / "empty.png")  # no metrics yet: still a valid figure
    assert png.stat().st_size > 0


def test_report_shows_diverged_runs_adapter_exports_and_shared_heatmap_cells(tmp_path):
    """A NaN loss (a diverged point) reads ``nan``, not ``-`` (no data); a LoRA run exported as its
    adapter alone is done; two seeds of one beta x lr give that cell their mean, not the last one."""
    diverged = make_run(tmp_path, "0", 0.1, 1e-6, steps=2)
    (diverged / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "eval/reward_accuracy": 0.9}\n')
    adapter = make_run(tmp_path, "1", 0.1, 1e-6, steps=2)
    (adapter / "final").mkdir()
    (adapter / "final" / "adapter_config.json").write_text("{}")
    runs = load_sweep(tmp_path)
    headers, rows = table(runs)
    by_name = {row[0]: dict(zip(headers, row)) for row in rows}
    assert by_name["0"]["loss"] == "nan" and by_name["0"]["status"] == "incomplete"
    assert by_name["1"]["loss"] == "0.6980" and by_name["1"]["status"] == "done"
    betas, lrs, grid, counts = heatmap_grid(runs)  # run 1: eval accuracy 0.5 + beta
    assert (betas, lrs, counts) == ([0.1], [1e-6], [[2]]) and grid[0][0] == pytest.approx((0.9 + 0.6) / 2)


def test_dpo_report_cli(tmp_path, capsys):
    from launch.report import main

    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2
    make_run(tmp_path, "0", 0.1, 1e-6, steps=4, final=True)
    make_run(tmp_path, "1", 0.5, 1e-6, steps=4, final=True)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "loss.beta=0.1" in out and (tmp_path / "r.png").exists()
    assert main([str(tmp_path), "--out", str(tmp_path / "missing" / "r.png")]) == 2  # a user error: one line
    assert capsys.readouterr().err.splitlines() == [
        f"dpo-report: error: {tmp_path / 'missing' / 'r.png'}: cannot write the plot: No such file or directory"
    ]


def test_a_killed_rank_is_named_not_the_peer_that_lost_its_connection(tmp_path, monkeypatch):
    """kill -9 (or the OOM killer) on rank 1 leaves it without a result; rank 0 then fails with
    "Connection closed by peer". The message names rank 1 and what srun said about it."""
    import pickle
    from types import SimpleNamespace

    import slurm.submit as submit

    monkeypatch.setattr(submit, "job_state", lambda job_id: "FAILED")
    tasks = []
    for rank in range(3):
        paths = SimpleNamespace(result_pickle=tmp_path / f"{rank}_result.pkl", stderr=tmp_path / f"{rank}_log.err")
        paths.stderr.write_text("")
        tasks.append(SimpleNamespace(paths=paths))
    with open(tasks[0].paths.result_pickle, "wb") as f:
        pickle.dump(("error", "Traceback ...\nRuntimeError: Connection closed by peer [10.0.0.2]:29500"), f)
    with open(tasks[2].paths.result_pickle, "wb") as f:
        pickle.dump(("error", "Traceback ...\nRuntimeError: Connection closed by peer [10.0.0.2]:29500"), f)
    tasks[0].paths.stderr.write_text("...\nsrun: error: n2: tasks 1-2: Killed\nsrun: Terminating StepId=395.0\n")
    job = SimpleNamespace(job_id="395", num_tasks=3, task=lambda i: tasks[i])
    outcome = submit.job_outcome(job, tmp_path / "run")
    assert not outcome.ok
    assert outcome.message == (
        f"Slurm job 395 FAILED: rank 1: ended without a result (srun: n2: task 1: Killed) (log: {tasks[1].paths.stderr})"
    )
    # A Python error on rank 2 (its own error result), then srun kills the others: rank 2's error.
    tasks[0].paths.stderr.write_text("srun: error: n2: task 2: Exited with exit code 1\nsrun: error: n1: task 0: Killed\n")
    with open(tasks[2].paths.result_pickle, "wb") as f:
        pickle.dump(("error", "Traceback ...\nValueError: bad shape"), f)
    assert "FAILED: rank 2: ValueError: bad shape" in submit.job_outcome(job, tmp_path / "run").message
    # A rank that exited with a status of its own (a user error: exit 2, its message in status.json)
    # was not killed: it is not named as "ended without a result".
    tasks[0].paths.stderr.write_text("srun: error: n2: task 1: Exited with exit code 2\n")
    assert "ended without a result" not in submit.job_outcome(job, tmp_path / "run").message
    tasks[0].paths.stderr.write_text("")  # no srun line: the lowest rank's error, as before
    assert "FAILED: rank 0: RuntimeError: Connection closed" in submit.job_outcome(job, tmp_path / "run").message


def test_a_job_pending_on_a_limit_is_reported_once(monkeypatch, capsys, tmp_path):
    """cluster.nodes=3 on a 2-node partition pends with PartitionNodeLimit forever: say so once
    instead of waiting in silence; an ordinary wait for resources says nothing."""
    from types import SimpleNamespace

    import slurm.submit as submit

    reasons = {"501": "PartitionNodeLimit", "502": "Resources"}
    monkeypatch.setattr(submit, "job_state", lambda job_id: "PENDING")
    monkeypatch.setattr(submit, "pending_reason", lambda job_id: reasons[job_id])
    task = SimpleNamespace(paths=SimpleNamespace(result_pickle=tmp_path / "none.pkl"))
    for job_id in ("501", "502"):
        job = SimpleNamespace(job_id=job_id, num_tasks=1, task=lambda i: task)
        assert not submit._finished(job, poll_state=True) and not submit._finished(job, poll_state=True)
    err = capsys.readouterr().err
    assert err.count("warning: Slurm job 501 is pending with reason PartitionNodeLimit") == 1
    assert "502" not in err
