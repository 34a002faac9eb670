"""A run preempted at an eval step, its last one included, resumes to the same metrics.jsonl
rows (train and eval), the same final/ and the same final eval metrics from ``train()`` as an
uninterrupted run.

A preempted step skips its eval and checkpoints at once; the resumed run must log that eval.
The preemption is a real SIGUSR1 to the rank (the engine's PreemptionFlag), sent during the
chosen step, so it always lands on that step. Every run is one rank: this module, run as
``python -m tests.integration.test_last_step_preemption CONFIG RESULT [PREEMPT_AT]``, is that
rank (``dpo_dist.worker`` with the signal added, and ``train()``'s return value saved).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.worker import PREEMPTED_EXIT_CODE
from tests.helpers import REPO, make_tiny_assets, tiny_run_overrides

pytestmark = pytest.mark.integration

# Evals at steps 2 and 4 (the last); train rows at 2 and 4 (eval steps) and 3 (log_every).
STEPS = {"train.max_steps": 4, "train.eval_every": 2, "train.log_every": 3, "train.checkpoint_every": 0}


def compose_config(overrides: list[str]):
    """The DPOConfig that ``dpo-train`` builds from ``overrides`` (conf/ composed by Hydra)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from dpo_dist.config import config_from_dict
    from launch.common import CONF_DIR, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name="config", overrides=overrides)
            return config_from_dict(OmegaConf.to_container(composed, resolve=True, throw_on_missing=True))
    finally:
        GlobalHydra.instance().clear()


def run_rank(cfg, out: Path, preempt_at: int | str = 0) -> tuple[int, dict]:
    """Train ``cfg`` with output_dir ``out`` as one rank (SIGUSR1 at ``preempt_at``, see ``_rank``,
    if given); returns the exit status and what ``train()`` returned."""
    from dpo_dist.distributed import free_port
    from dpo_dist.runinfo import write_config

    config = write_config(dataclasses.replace(cfg, output_dir=str(out)))
    result = out / "train_result.json"
    result.unlink(missing_ok=True)
    env = {
        **os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "tests.integration.test_last_step_preemption", str(config), str(result), str(preempt_at)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, PREEMPTED_EXIT_CODE), proc.stderr[-4000:]
    return proc.returncode, json.loads(result.read_text()) if result.exists() else {}


def read_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def row_key(row: dict) -> tuple[int, str]:
    return row["step"], "eval" if any(k.startswith("eval/") for k in row) else "train"


def assert_close(got: dict, want: dict, where) -> None:
    """Same keys, values equal to 1e-6 relative (tokens_per_s is a timing)."""
    assert set(got) == set(want), (where, sorted(got), sorted(want))
    for key in want:
        if key != "tokens_per_s":
            assert math.isclose(got[key], want[key], rel_tol=1e-6, abs_tol=1e-9), (where, key, got[key], want[key])


def assert_same_run(out: Path, baseline: dict, returned: dict) -> None:
    """``out``'s metrics.jsonl, final/ and train() result are the uninterrupted run's."""
    import torch
    from safetensors.torch import load_file

    rows, want = read_rows(out), baseline["rows"]
    keys = [row_key(r) for r in rows]
    assert len(set(keys)) == len(keys), f"duplicate rows: {keys}"
    assert keys == [row_key(r) for r in want], (keys, [row_key(r) for r in want])
    for got_row, want_row in zip(rows, want):
        assert_close(got_row, want_row, row_key(want_row))
    assert_close(returned, baseline["returned"], "train() return value")
    final, want_final = load_file(out / "final" / "model.safetensors"), baseline["final"]
    assert final.keys() == want_final.keys()
    for name, tensor in want_final.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny run's config and the uninterrupted run: its rows, train() result and final/."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("last_step")
    assets = make_tiny_assets(root)
    settings = {"output_dir": root / "unset", "reference.cache_dir": root / "refcache", **STEPS}
    cfg = compose_config(tiny_run_overrides(assets, settings))
    status, returned = run_rank(cfg, root / "full")
    assert status == 0
    rows = read_rows(root / "full")
    assert [row_key(r) for r in rows] == [(2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval")]
    assert returned and returned == {k: v for k, v in rows[-1].items() if k != "step"}
    final = load_file(root / "full" / "final" / "model.safetensors")
    return cfg, {"rows": rows, "returned": returned, "final": final}


def test_preempted_at_the_last_step_logs_the_final_eval_on_resume(setup, tmp_path):
    cfg, baseline = setup
    out = tmp_path / "run"
    status, _ = run_rank(cfg, out, preempt_at=4)
    assert status == PREEMPTED_EXIT_CODE
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").exists() and not (out / "final").exists()
    assert [row_key(r) for r in read_rows(out)][-1] == (4, "train")  # its eval skipped

    status, returned = run_rank(cfg, out)
    assert status == 0
    assert json.loads((out / "run_info.json").read_text())["resumed_from_step"] == 4
    assert_same_run(out, baseline, returned)


def test_preempted_at_an_eval_step_logs_its_train_and_eval_rows(setup, tmp_path):
    """Step 2 is an eval step but not a log_every one: its train row is written when preempted,
    its eval row by the resumed run, in the uninterrupted run's order."""
    cfg, baseline = setup
    out = tmp_path / "run"
    status, _ = run_rank(cfg, out, preempt_at=2)
    assert status == PREEMPTED_EXIT_CODE
    assert [row_key(r) for r in read_rows(out)] == [(2, "train")]

    status, returned = run_rank(cfg, out)
    assert status == 0
    assert json.loads((out / "run_info.json").read_text())["resumed_from_step"] == 2
    assert_same_run(out, baseline, returned)


@pytest.mark.parametrize("when", ["save", "export"])
def test_a_signal_after_the_last_step_requeues_and_the_resumed_job_exports(setup, tmp_path, when):
    """A signal while the last step's checkpoint is saved ("save": after the step agreed not to
    stop) or once the export has begun ("export": asked before each shard) requeues, instead of
    a long export that the scheduler kills halfway; the resumed job starts at the last step,
    logs nothing twice and exports the same final/."""
    cfg, baseline = setup
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=4))  # same numbers
    out = tmp_path / "run"
    status, _ = run_rank(cfg, out, preempt_at=when)
    assert status == PREEMPTED_EXIT_CODE
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").exists() and not (out / "final").exists()
    assert [row_key(r) for r in read_rows(out)] == [row_key(r) for r in baseline["rows"]]  # the last eval ran

    status, returned = run_rank(cfg, out)
    assert status == 0
    assert json.loads((out / "run_info.json").read_text())["resumed_from_step"] == 4
    assert_same_run(out, baseline, returned)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("final")) == ["final"]


def test_a_signal_during_a_checkpoint_export_requeues_and_the_resumed_job_exports_it(setup, tmp_path):
    """train.export_checkpoints: a checkpoint's hf/ is written once the checkpoint is complete,
    asking between shards for a stop ("export": the signal comes as step 2's export begins). The
    job requeues with step 2 complete but no hf/ (only its staging directory); the resumed job
    exports it first, then trains on to the uninterrupted run's rows and final/, and best/."""
    from safetensors.torch import load_file

    cfg, baseline = setup
    train = dataclasses.replace(cfg.train, checkpoint_every=2, export_checkpoints=True, metric_for_best_model="eval/loss")
    cfg = dataclasses.replace(cfg, train=train)
    out = tmp_path / "run"
    status, _ = run_rank(cfg, out, preempt_at="export")
    assert status == PREEMPTED_EXIT_CODE
    checkpoints = out / "checkpoints"
    assert (checkpoints / "step_00000002" / "COMPLETE").exists() and not (checkpoints / "step_00000002" / "hf").exists()
    assert [row_key(r) for r in read_rows(out)] == [(2, "train"), (2, "eval")]  # the eval ran before the save

    status, returned = run_rank(cfg, out)
    assert status == 0
    assert json.loads((out / "run_info.json").read_text())["resumed_from_step"] == 2
    assert_same_run(out, baseline, returned)
    assert sorted(p.name for p in checkpoints.glob("*/hf*")) == ["hf", "hf"]  # steps 2 and 4, no staging left
    assert load_file(checkpoints / "step_00000004" / "hf" / "model.safetensors").keys() == baseline["final"].keys()
    evals = {r["step"]: r["eval/loss"] for r in baseline["rows"] if "eval/loss" in r}
    best = min(evals, key=evals.get)
    assert json.loads((out / "best.json").read_text())["step"] == best
    assert (out / "best" / "model.safetensors").stat().st_ino == (checkpoints / f"step_{best:08d}" / "hf" / "model.safetensors").stat().st_ino


def _rank(config: str, result: str, preempt_at: str) -> int:
    """One rank of ``dpo_dist.worker``, sent SIGUSR1 (a preemption warning) while it runs step
    ``preempt_at`` (1-based), or after the last step's checkpoint ("save") or as the ZeRO-3
    export begins ("export"); none for "0". ``train()``'s return value goes to ``result``."""
    import signal

    from dpo_dist import engine, export, worker

    def warn() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)

    if preempt_at == "save":
        save_checkpoint = engine.save_checkpoint

        def saved_then_signalled(engine_, cfg, env, step, *args, **kwargs):
            save_checkpoint(engine_, cfg, env, step, *args, **kwargs)
            if step == cfg.train.max_steps:
                warn()

        engine.save_checkpoint = saved_then_signalled
    elif preempt_at == "export":
        save_consolidated = export.save_consolidated

        def signalled_then_saved(*args, **kwargs):
            warn()
            return save_consolidated(*args, **kwargs)

        export.save_consolidated = signalled_then_saved  # engine imports it at call time
    elif int(preempt_at):
        preempt_at = int(preempt_at)
        pairs_for_step = engine.PairSampler.pairs_for_step

        def signalled(self, step):  # step is 0-based: called at the start of step ``step + 1``
            if step + 1 == preempt_at:
                warn()
            return pairs_for_step(self, step)

        engine.PairSampler.pairs_for_step = signalled
    train = engine.train

    def train_and_save(cfg):
        returned = train(cfg)
        Path(result).write_text(json.dumps(returned))
        return returned

    engine.train = train_and_save  # worker.run_task imports it at call time
    return worker.main([config, "train"])


if __name__ == "__main__":
    status = _rank(sys.argv[1], sys.argv[2], sys.argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # as dpo_dist.worker does: no interpreter teardown under gloo/DeepSpeed threads
