"""Checkpoints as Hugging Face models (train.export_checkpoints) and the best checkpoint
(train.metric_for_best_model): settings, the best read back from a run directory, pruning that
keeps it, and the exports made from another export or found by dpo-eval."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from dpo_dist import checkpoint as C
from dpo_dist.config import BEST_METRICS, ConfigError, config_from_dict
from dpo_dist.runinfo import BestCheckpoint, best_checkpoint, check_same_run, read_best, write_config
from tests.helpers import run_cli

EVERY_2 = {"checkpoint_every": 2, "eval_every": 2}


def config(**sections):
    return config_from_dict(sections)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"train": {**EVERY_2, "metric_for_best_model": "eval_loss"}},
            "train.metric_for_best_model: got 'eval_loss', expected one of eval/loss, eval/nll_loss, eval/pref_loss, "
            "eval/reward_accuracy, eval/reward_margin",
        ),
        (
            {"train": {"checkpoint_every": 3, "eval_every": 2, "metric_for_best_model": "eval/loss"}},
            "train.metric_for_best_model: every checkpoint must be an eval step: train.checkpoint_every (3) must be a "
            "multiple of train.eval_every (2)",
        ),
        (
            {"train": {"checkpoint_every": 0, "eval_every": 2, "metric_for_best_model": "eval/loss"}},
            "train.metric_for_best_model: needs checkpoints and evals: train.checkpoint_every and train.eval_every > 0",
        ),
        (
            {"train": {"checkpoint_every": 2, "eval_every": 0, "metric_for_best_model": "eval/loss"}},
            "train.metric_for_best_model: needs checkpoints and evals",
        ),
        (
            {"train": {**EVERY_2, "metric_for_best_model": "eval/loss"}, "data": {"eval_path": None}},
            "train.metric_for_best_model: needs held-out pairs to evaluate: data.eval_path is null",
        ),
        (
            {"stage": "sft", "train": {**EVERY_2, "metric_for_best_model": "eval/reward_accuracy"}},
            "train.metric_for_best_model: stage=sft logs eval/loss alone, got eval/reward_accuracy",
        ),
        (
            {"train": {**EVERY_2, "metric_for_best_model": "eval/nll_loss"}},
            "train.metric_for_best_model: eval/nll_loss is logged by losses with an NLL term only (loss.alpha > 0",
        ),
        (
            {"train": {"checkpoint_every": 0, "export_checkpoints": True}},
            "train.export_checkpoints: needs checkpoints to export: train.checkpoint_every > 0",
        ),
    ],
)
def test_best_model_and_checkpoint_export_settings_are_checked(values, message):
    with pytest.raises(ConfigError) as info:
        config(**values)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_the_best_model_is_picked_on_held_out_records_of_the_training_file():
    """data.eval_split is held-out data as data.eval_path is."""
    cfg = config(train={**EVERY_2, "metric_for_best_model": "eval/loss"}, data={"eval_path": None, "eval_split": 0.1})
    assert cfg.train.metric_for_best_model == "eval/loss"


def test_the_direction_is_inferred_from_the_metric_and_valid_settings_pass():
    assert {name: config(train={**EVERY_2, "metric_for_best_model": name}, loss={"alpha": 1.0}).train.greater_is_better() for name in BEST_METRICS} == {
        "eval/loss": False,
        "eval/nll_loss": False,
        "eval/pref_loss": False,
        "eval/reward_accuracy": True,
        "eval/reward_margin": True,
    }
    # Checkpoints every 4 steps, evals every 2: every checkpoint is an eval step.
    config(train={"checkpoint_every": 4, "eval_every": 2, "metric_for_best_model": "eval/loss", "export_checkpoints": True})
    config(stage="sft", train={**EVERY_2, "metric_for_best_model": "eval/loss"})


def test_an_sft_first_chain_tracks_the_best_model_of_its_dpo_stage_only():
    """The DPO stage starts from sft/final (the last SFT step); eval/reward_accuracy means nothing to SFT."""
    chain = config(train={**EVERY_2, "metric_for_best_model": "eval/reward_accuracy"}, sft_first={"max_steps": 4})
    sft, dpo = chain.stages()
    assert sft.train.metric_for_best_model is None and dpo.train.metric_for_best_model == "eval/reward_accuracy"


def test_an_unknown_best_metric_on_the_command_line_is_one_line_exit_2():
    result = run_cli("launch.train", "train.metric_for_best_model=accuracy")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("dpo-train: error: train.metric_for_best_model: got 'accuracy', expected one of eval/loss")


def test_both_settings_may_change_between_the_jobs_of_a_run(tmp_path):
    out = tmp_path / "run"
    write_config(config(output_dir=str(out)))
    (out / "metrics.jsonl").write_text("")
    check_same_run(config(output_dir=str(out), train={"export_checkpoints": True, "metric_for_best_model": "eval/loss"}))


def make_run(out, evals: dict[int, float | None], complete: list[int], incomplete: list[int] = (), metric: str = "eval/loss"):
    """A run directory with an eval row of ``metric`` per step of ``evals`` (None: a train row only)
    and checkpoint directories of ``complete`` and ``incomplete`` steps."""
    rows = []
    for step, value in evals.items():
        rows.append({"step": step, "loss": 0.5})
        if value is not None:
            rows.append({"step": step, metric: value, "eval/reward_margin": 0.0})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for step in [*complete, *incomplete]:
        tag = out / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        if step in complete:
            (tag / "COMPLETE").write_text(f"{step}\n")
    return out


def test_the_best_is_the_checkpoint_with_the_best_logged_eval(tmp_path):
    # Step 3: the best eval, but no checkpoint was saved for it; step 5: its checkpoint is half
    # written (a job killed while saving): neither can be the best. Step 6: no eval row (a
    # preemption checkpoint whose eval the resumed job logs).
    out = make_run(tmp_path / "run", {2: 0.7, 3: 0.1, 4: 0.6, 5: 0.2, 6: None}, complete=[2, 4, 6], incomplete=[5])
    assert best_checkpoint(out, "eval/loss", greater_is_better=False) == BestCheckpoint("eval/loss", False, 4, 0.6, "checkpoints/step_00000004")
    assert best_checkpoint(out, "eval/loss", greater_is_better=True).step == 2
    assert best_checkpoint(out, "eval/reward_accuracy", greater_is_better=True) is None  # never logged
    assert best_checkpoint(tmp_path / "nothing", "eval/loss", greater_is_better=False) is None


def test_the_first_of_equal_values_wins_and_nan_never(tmp_path):
    """As HF's strict comparison: a later checkpoint must be better, not as good."""
    out = make_run(tmp_path / "run", {2: math.nan, 4: 0.75, 6: 0.75, 8: 0.5}, complete=[2, 4, 6, 8], metric="eval/reward_accuracy")
    assert best_checkpoint(out, "eval/reward_accuracy", greater_is_better=True).step == 4
    assert best_checkpoint(out, "eval/reward_accuracy", greater_is_better=False).step == 8


def test_the_best_so_far_survives_a_resume(tmp_path):
    """A resumed job knows the best from the files alone: metrics.jsonl cut back to its checkpoint
    (MetricsLog) and the checkpoints on disk. Step 6 was logged best but its checkpoint was never
    completed: the resumed job starts at 4, and its best is 2 again, not a lost step."""
    from dpo_dist.runinfo import MetricsLog

    out = make_run(tmp_path / "run", {2: 0.5, 4: 0.6, 6: 0.1}, complete=[2, 4], incomplete=[6])
    MetricsLog(out, resume_step=4)
    assert best_checkpoint(out, "eval/loss", greater_is_better=False).step == 2


def test_track_best_records_and_logs_a_new_best_once(tmp_path, caplog):
    out = make_run(tmp_path / "run", {2: 0.7, 4: 0.6}, complete=[2, 4])
    cfg = config(output_dir=str(out), train={**EVERY_2, "metric_for_best_model": "eval/loss"})
    with caplog.at_level(logging.INFO, logger="dpo_dist.engine"):
        assert C.track_best(cfg).step == 4
        assert C.track_best(cfg).step == 4
    assert read_best(out) == BestCheckpoint("eval/loss", False, 4, 0.6, "checkpoints/step_00000004")
    assert json.loads((out / "best.json").read_text())["step"] == 4
    logged = [r.getMessage() for r in caplog.records if "best checkpoint" in r.getMessage()]
    assert logged == ["best checkpoint so far: step 4 (eval/loss 0.6), kept beside the newest train.keep_checkpoints"]
    assert C.track_best(config(output_dir=str(out))) is None  # no metric: no best


def test_pruning_keeps_the_best_checkpoint_beside_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step_{step:08d}" / "hf").mkdir(parents=True)
        (root / f"step_{step:08d}" / "COMPLETE").write_text(f"{step}\n")
    (root / "step_00000010").mkdir()  # half written: pruned
    C._prune_checkpoints(root, keep=1, also_keep="step_00000004")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000008"]
    C._prune_checkpoints(root, keep=1, also_keep="step_00000008")  # the best is the newest: one left
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008"]


def test_link_export_swaps_in_hard_links_that_outlive_the_source(tmp_path):
    from dpo_dist.export import link_export

    source = tmp_path / "checkpoints" / "step_00000004" / "hf"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"weights")
    out = tmp_path / "best"
    out.mkdir()
    (out / "config.json").write_text('{"old": 1}')  # an earlier export is replaced whole
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    link_export(source, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino
    assert not (tmp_path / "best.tmp").exists()
    C._rmtree(source.parent)  # the checkpoint pruned: best/ keeps its files
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_dpo_eval_of_a_checkpoint_takes_its_hf_export(tmp_path, monkeypatch):
    """A checkpoint with hf/ needs no conversion; one without is exported as before."""
    from dpo_dist import export
    from dpo_dist.evaluation import policy_model_dir

    exported_by_hand = []
    monkeypatch.setattr(export, "export_checkpoint", lambda path, out: exported_by_hand.append((path, out)))

    run = tmp_path / "run"
    for step, exported in ((2, True), (4, True), (6, False)):
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text(f"{step}\n")
        if exported:
            (tag / "hf").mkdir()
            (tag / "hf" / "config.json").write_text("{}")
    (run / "checkpoints" / "step_00000006" / "hf.tmp").mkdir()  # an export cut short: not a model

    def evaluated(policy_path):
        return policy_model_dir(config(output_dir=str(tmp_path / "ev"), eval={"policy_path": str(policy_path)}))

    assert evaluated(run / "checkpoints" / "step_00000002") == run / "checkpoints" / "step_00000002" / "hf"
    assert evaluated(run) == tmp_path / "ev" / "policy"  # the newest complete one, step 6, has no hf/
    assert exported_by_hand == [(run, tmp_path / "ev" / "policy")]
    C._rmtree(run / "checkpoints" / "step_00000006")
    assert evaluated(run) == run / "checkpoints" / "step_00000004" / "hf"


def test_exports_of_a_run_that_trains_longer_are_removed_before_it_trains(tmp_path):
    """A finished 4-step run set to 6 steps: its final/ and best/ hold step-4 weights. Were the job
    stopped during the 6-step export (metrics already at step 6), the stale final/ would make the
    run look finished; so they go before training."""
    cfg = config(output_dir=str(tmp_path), train={"max_steps": 6})
    for name in ("final", "best"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 7)))
    assert C.finished_metrics(cfg) is not None, "what a stopped export would leave looks finished"
    C.drop_earlier_exports(cfg)
    assert not (tmp_path / "final").exists() and not (tmp_path / "best").exists()
    assert C.finished_metrics(cfg) is None


# ---- the exports at the end of a run and on resume, with engine.export_hf recorded -----------------

def one_rank():
    from dpo_dist.distributed import DistEnv

    return DistEnv(0, 0, 1, "127.0.0.1", 1, None)


def model_dir(path, weights: str):
    """A stand-in Hugging Face export whose config.json names the weights it holds (replacing
    an earlier one, as every export does)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"weights": weights}))
    return path


def weights(path) -> str:
    return json.loads((path / "config.json").read_text())["weights"]


@pytest.fixture
def exported(monkeypatch):
    """engine.export_hf recorded: the 'engine' passed is the name of the weights it holds."""
    calls = []

    def export_hf(engine, cfg, tokenizer, out_dir, env, stop=None):
        calls.append(out_dir)
        model_dir(out_dir, engine)

    monkeypatch.setattr(C, "export_hf", export_hf)
    return calls


def test_final_is_linked_only_from_an_export_of_the_last_steps_weights(tmp_path, exported):
    """best/ holds an earlier step's weights unless the best is the last step: final/ is then the
    engine's own export, never a link to best/."""
    out = tmp_path / "run"
    cfg = config(output_dir=str(out), train={"max_steps": 4, **EVERY_2, "metric_for_best_model": "eval/loss"})
    model_dir(out / "best", "step 2")
    C.export_final("step 4", cfg, None, one_rank(), best=BestCheckpoint("eval/loss", False, 2, 0.5, "checkpoints/step_00000002"))
    assert exported == [out / "final"] and weights(out / "final") == "step 4"

    C._rmtree(out / "final")
    C.export_final("step 4", cfg, None, one_rank(), best=BestCheckpoint("eval/loss", False, 4, 0.5, "checkpoints/step_00000004"))
    assert len(exported) == 1 and (out / "final" / "config.json").stat().st_ino == (out / "best" / "config.json").stat().st_ino

    C._rmtree(out / "final")  # train.export_checkpoints: the last checkpoint's hf/ is the last step's
    model_dir(out / "checkpoints" / "step_00000004" / "hf", "step 4")
    with_exports = config(output_dir=str(out), train={"max_steps": 4, **EVERY_2, "export_checkpoints": True})
    C.export_final("step 4", with_exports, None, one_rank())
    assert len(exported) == 1 and weights(out / "final") == "step 4"


def test_best_is_exported_from_the_best_checkpoint_whichever_holds_it(tmp_path, exported, monkeypatch):
    """best/: linked from the best checkpoint's hf/; the engine's export when the best is the last
    step; else converted from the best checkpoint (dpo-export) in the training dtype."""
    from dpo_dist import export

    converted = []
    monkeypatch.setattr(export, "export_checkpoint", lambda directory, out, dtype, cfg: converted.append((directory, dtype)) or model_dir(out, directory.name))
    cpu = torch.device("cpu")
    out = make_run(tmp_path / "run", {2: 0.5, 4: 0.7}, complete=[2, 4])

    def cfg(**model):
        return config(output_dir=str(out), model=model, train={"max_steps": 4, **EVERY_2, "metric_for_best_model": "eval/loss"})

    best = C.export_best("step 4", cfg(dtype="fp32"), None, one_rank(), cpu)
    assert best.step == 2 and read_best(out) == best  # found from the files, not from a best.json
    assert converted == [(out / "checkpoints" / "step_00000002", "fp32")] and not exported
    assert weights(out / "best") == "step_00000002"
    C.export_best("step 4", cfg(dtype="bf16"), None, one_rank(), cpu)
    assert converted[-1] == (out / "checkpoints" / "step_00000002", "bf16")

    model_dir(out / "checkpoints" / "step_00000002" / "hf", "step 2")
    C.export_best("step 4", cfg(dtype="fp32"), None, one_rank(), cpu)
    assert len(converted) == 2 and (out / "best" / "config.json").stat().st_ino == (out / "checkpoints" / "step_00000002" / "hf" / "config.json").stat().st_ino

    out = make_run(tmp_path / "last", {2: 0.7, 4: 0.5}, complete=[2, 4])
    assert C.export_best("step 4", cfg(dtype="fp32"), None, one_rank(), cpu).step == 4
    assert exported == [out / "best"] and weights(out / "best") == "step 4" and len(converted) == 2
    assert C.export_best("step 4", config(output_dir=str(out)), None, one_rank(), cpu) is None


def test_a_resumed_job_exports_the_checkpoint_it_resumes_from_once(tmp_path, exported):
    out = tmp_path / "run"
    cfg = config(output_dir=str(out), train={"max_steps": 6, **EVERY_2, "export_checkpoints": True})
    C.resume_pending_export("step 0", cfg, None, one_rank(), 0)  # a fresh run: nothing to export
    C.resume_pending_export("step 4", config(output_dir=str(out), train={"max_steps": 6}), None, one_rank(), 4)
    assert exported == []
    C.resume_pending_export("step 4", cfg, None, one_rank(), 4)
    assert exported == [out / "checkpoints" / "step_00000004" / "hf"] and weights(exported[0]) == "step 4"
    C.resume_pending_export("step 4", cfg, None, one_rank(), 4)  # already there
    assert len(exported) == 1


def test_a_stopped_export_requeues_from_the_step_it_exports(tmp_path, exported):
    cfg = config(output_dir=str(tmp_path))
    with pytest.raises(C.Preempted) as info:
        C.stoppable_export("step 4", cfg, None, one_rank(), tmp_path / "final", 4, stop=lambda: True)
    assert info.value.step == 4 and not exported and not (tmp_path / "final").exists()


def test_saving_a_checkpoint_keeps_the_best_so_far_beside_the_newest(tmp_path):
    """save_checkpoint: COMPLETE, then best.json and the pruning that spares the best."""

    class Engine:
        def save_checkpoint(self, root, tag, **_):
            (Path(root) / tag).mkdir(parents=True)

    out = tmp_path / "run"
    cfg = config(output_dir=str(out), train={"max_steps": 8, **EVERY_2, "keep_checkpoints": 1, "metric_for_best_model": "eval/loss"})
    rows = []
    kept = {}
    for step, loss in ((2, 0.5), (4, 0.7), (6, 0.6), (8, 0.4)):
        rows.append({"step": step, "eval/loss": loss})
        out.mkdir(exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        C.save_checkpoint(Engine(), cfg, one_rank(), step)
        kept[step] = (sorted(p.name[-1] for p in (out / "checkpoints").iterdir()), read_best(out).step)
    assert kept == {2: (["2"], 2), 4: (["2", "4"], 2), 6: (["2", "6"], 2), 8: (["8"], 8)}
