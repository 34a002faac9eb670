"""Sweep report: one table row per run directory of a sweep, and a PNG of how the runs trained.

Pure functions over the files runs leave behind (``dpo-report`` in ``launch/report.py`` adds the
command line and the scheduler lookup):

- a run directory is a sub-directory of the sweep directory with a ``config.yaml`` or a Hydra
  ``.hydra/`` folder (a Hydra sweep makes ``0/``, ``1/``, ...); a run directory given as the sweep
  directory is a sweep of one;
- what distinguishes runs: the overrides that differ between them (``.hydra/overrides.yaml``),
  else the config keys whose values differ (``config.yaml``);
- metrics: the last train row's ``loss``, the last eval row's ``eval/reward_accuracy`` and
  ``eval/reward_margin``, the median ``tokens_per_s`` (``metrics.jsonl``);
- status: ``done`` once ``final/`` holds the exported model (or, with
  ``model.lora.merge_on_export=false``, the exported adapter); otherwise what ``status.json``
  (written by Slurm runs) says, refined by the scheduler when it is asked (a job that died
  without writing anything shows as ``failed``/``cancelled``/``timeout``...), else ``pending``
  (no ``run_info.json`` yet) or ``incomplete`` (started, not finished, nothing else known);
- win-rate hook: an optional ``winrate.json`` in the run directory (``dpo-eval winrate``) adds
  the columns in :data:`WINRATE_COLUMNS` when any run has one;
- notes (printed under the table): a failed or preempted run's message, and every file of a run
  that is there but unreadable (``config.yaml``, ``status.json``, ``winrate.json``, ...: not JSON
  or YAML, or not the object expected), which the report then reads as absent.

The plot (``report.png``): eval reward accuracy vs step and train loss vs step, one line per run,
and a ``loss.beta`` x ``optim.lr`` heatmap of the final eval reward accuracy (the mean, marked
``n=k``, where k runs share a cell, e.g. a sweep over seeds too).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# winrate.json key -> column header. Extend here to show more of what dpo-eval winrate writes.
WINRATE_COLUMNS = {
    "win_rate": "win_rate",
    "tie_rate": "tie_rate",
    "loss_rate": "loss_rate",
    "score": "win_score",
    "score_ci95": "score_ci95",
}

# Slurm states (status.json says the run is alive, the scheduler says otherwise) -> status word.
_SCHEDULER_STATUS = {
    "PENDING": "pending",
    "REQUEUED": "requeued",
    "RUNNING": "running",
    "CANCELLED": "cancelled",
    "TIMEOUT": "timeout",
    "FAILED": "failed",
    "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "DEADLINE": "timeout",
    "PREEMPTED": "preempted",
    "COMPLETED": "incomplete",  # the job ended but the run has no final model
}


@dataclass
class Run:
    """Everything the report needs from one run directory."""

    name: str
    path: Path
    overrides: list[str]
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    status: str
    winrate: dict[str, Any] | None = None
    info: dict[str, Any] | None = None
    """run_info.json, once the run has started."""
    label: str = ""  # what distinguishes this run from the others (set by describe_runs)
    notes: list[str] = field(default_factory=list)

    def param(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def max_steps(self) -> int | None:
        """The run's steps: run_info's (train.epochs resolved over its data), else config.yaml's."""
        resolved = (self.info or {}).get("max_steps")
        if resolved is not None:
            return resolved
        return None if self.param("train.epochs") is not None else self.param("train.max_steps")

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.train), default=0)

    def final(self, key: str) -> float | None:
        rows = self.evals if key.startswith("eval/") else self.train
        values = [r[key] for r in rows if r.get(key) is not None]
        return float(values[-1]) if values else None

    @property
    def tokens_per_s(self) -> float | None:
        values = [float(r["tokens_per_s"]) for r in self.train if r.get("tokens_per_s")]
        return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- loading


def find_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """Run directories of a sweep, numerically ordered (``2`` before ``10``)."""
    sweep_dir = Path(sweep_dir)
    if _is_run_dir(sweep_dir):
        return [sweep_dir]
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and _is_run_dir(p)]
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / ".hydra").is_dir()


def _read_text(path: Path, run_dir: Path, notes: list[str]) -> str | None:
    """``path``'s text; None when there is no such file or it cannot be read (then noted)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        return _unreadable(path, run_dir, notes, e.strerror or str(e))


def _read_json(path: Path, run_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    """``path``'s JSON object; None when there is no such file, or when it is unreadable (then
    with a note naming it in ``notes``)."""
    text = _read_text(path, run_dir, notes)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        return _unreadable(path, run_dir, notes, f"not JSON: {e}")
    return data if isinstance(data, dict) else _unreadable(path, run_dir, notes, "not a JSON object")


def _read_yaml(path: Path, run_dir: Path, notes: list[str], expected: type = dict) -> Any:
    """``path``'s YAML value, which must be an ``expected``; None when there is no such file, or
    when it is unreadable (then with a note naming it in ``notes``)."""
    text = _read_text(path, run_dir, notes)
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        return _unreadable(path, run_dir, notes, f"not YAML: {getattr(e, 'problem', None) or type(e).__name__}{where}")
    if not isinstance(data, expected):
        return _unreadable(path, run_dir, notes, f"not a YAML {'mapping' if expected is dict else 'list'}")
    return data


def _unreadable(path: Path, run_dir: Path, notes: list[str], reason: str) -> None:
    """Note that the run's file ``path`` is there but cannot be used: the report reads it as absent."""
    notes.append(f"{run_dir.name}: {path.relative_to(run_dir).as_posix()} is unreadable ({reason}); ignored")
    return None


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, eval rows) of ``metrics.jsonl``; a half-written last line is skipped."""
    train, evals = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return train, evals
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a run that is still writing
        if "loss" in row:
            train.append(row)
        if any(k.startswith("eval/") for k in row):
            evals.append(row)
    return train, evals


def load_run(path: Path, scheduler_state: Callable[[str], str | None] | None = None) -> Run:
    """Read one run directory; ``scheduler_state(job_id)`` (optional) asks Slurm about its job."""
    notes: list[str] = []
    config = (
        _read_yaml(path / "config.yaml", path, notes) or _read_yaml(path / ".hydra" / "config.yaml", path, notes) or {}
    )
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml", path, notes, list) or []
    train, evals = read_metrics(path / "metrics.jsonl")
    run = Run(
        name=path.name,
        path=path,
        overrides=[str(o) for o in overrides],
        config=config,
        train=train,
        evals=evals,
        status="",
        winrate=_read_json(path / "winrate.json", path, notes),
        info=_read_json(path / "run_info.json", path, notes),
        notes=notes,
    )
    run.status = run_status(path, _read_json(path / "status.json", path, run.notes), scheduler_state, run.notes)
    return run


def run_status(
    path: Path,
    record: dict[str, Any] | None,
    scheduler_state: Callable[[str], str | None] | None = None,
    notes: list[str] | None = None,
) -> str:
    """``done``, ``running``, ``pending``, ``requeued``, ``preempted``, ``failed``, ... (module doc)."""
    # final/ appears whole (export writes it atomically): a model, or an adapter-only LoRA export.
    if any((path / "final" / name).is_file() for name in ("config.json", "adapter_config.json")):
        return "done"
    if record is None:
        return "incomplete" if (path / "run_info.json").is_file() else "pending"
    state = str(record.get("state") or "incomplete")
    if state in ("failed", "preempted") and notes is not None and record.get("message"):
        notes.append(f"{path.name}: {state}: {record['message']}")
    if state in ("running", "requeued") and scheduler_state and record.get("job_id"):
        slurm = scheduler_state(str(record["job_id"]))
        if slurm:
            state = _SCHEDULER_STATUS.get(slurm.split()[0], slurm.lower())
    return state


def load_sweep(sweep_dir: str | Path, scheduler_state: Callable[[str], str | None] | None = None) -> list[Run]:
    runs = [load_run(p, scheduler_state) for p in find_run_dirs(sweep_dir)]
    describe_runs(runs)
    return runs


# ----------------------------------------------------------------------------- what differs


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _varying(assignments: list[dict[str, Any]]) -> list[str]:
    """Keys (in first-seen order) whose value is not the same in every run."""
    keys = list(dict.fromkeys(k for a in assignments for k in a))
    return [k for k in keys if len({json.dumps(a.get(k), sort_keys=True, default=str) for a in assignments}) > 1]


def describe_runs(runs: list[Run]) -> None:
    """Set each run's ``label``: its overrides that differ between runs, else its differing config keys.

    A single run has nothing to be told apart from: no label.
    """
    if len(runs) < 2:
        return
    if all(r.overrides for r in runs) or all((r.path / ".hydra").is_dir() for r in runs):
        parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r.overrides) for r in runs]
        keys = _varying(parsed)
        for run, assignment in zip(runs, parsed):
            run.label = " ".join(f"{k}={assignment[k]}" for k in keys if k in assignment)
        return
    flat = [{k: v for k, v in _flatten(r.config).items() if k != "output_dir"} for r in runs]
    keys = _varying(flat)
    for run, assignment in zip(runs, flat):
        run.label = " ".join(f"{k}={assignment.get(k)}" for k in keys)


# ----------------------------------------------------------------------------- table


def _fmt(value: float | None, spec: str) -> str:
    """``-`` for no value; a NaN (a diverged run logs ``NaN`` losses) stays visible as ``nan``."""
    if value is None:
        return "-"
    return format(value, spec)


def _winrate_cell(value) -> str:
    """A rate as 0.xxx; a 95% interval (``[lo, hi]`` in winrate.json) as lo-hi."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]:.3f}-{value[1]:.3f}"
    return _fmt(value, ".3f")


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of strings per run."""
    headers = ["run", "overrides", "step", "loss", "eval_acc", "eval_margin", "tokens/s", "status"]
    with_winrate = [c for c in WINRATE_COLUMNS if any(r.winrate and c in r.winrate for r in runs)]
    headers += [WINRATE_COLUMNS[c] for c in with_winrate]
    rows = []
    for run in runs:
        steps = f"{run.last_step}/{run.max_steps}" if run.max_steps else str(run.last_step)
        row = [
            run.name,
            run.label or "-",
            steps,
            _fmt(run.final("loss"), ".4f"),
            _fmt(run.final("eval/reward_accuracy"), ".3f"),
            _fmt(run.final("eval/reward_margin"), ".4f"),
            _fmt(run.tokens_per_s, ".0f"),
            run.status,
        ]
        row += [_winrate_cell((run.winrate or {}).get(c)) for c in with_winrate]
        rows.append(row)
    return headers, rows


def format_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    """Left-aligned text columns, two spaces apart."""
    rows = list(rows)
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [headers, *rows]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def heatmap_grid(runs: list[Run]) -> tuple[list[float], list[float], list[list[float]], list[list[int]]]:
    """(betas, lrs, accuracy[beta][lr], runs[beta][lr]) of the final eval reward accuracy: the mean
    over the runs that share a cell and how many they are (0 and NaN where no run has one)."""
    betas = sorted({float(b) for b in (r.param("loss.beta") for r in runs) if b is not None})
    lrs = sorted({float(lr) for lr in (r.param("optim.lr") for r in runs) if lr is not None})
    values: list[list[list[float]]] = [[[] for _ in lrs] for _ in betas]
    for run in runs:
        beta, lr, acc = run.param("loss.beta"), run.param("optim.lr"), run.final("eval/reward_accuracy")
        if beta is not None and lr is not None and acc is not None:
            values[betas.index(float(beta))][lrs.index(float(lr))].append(acc)
    grid = [[statistics.fmean(cell) if cell else math.nan for cell in row] for row in values]
    return betas, lrs, grid, [[len(cell) for cell in row] for row in values]


def plot(runs: list[Run], out_path: str | Path) -> Path:
    """Write the report figure (PNG) to ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster login nodes
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss, ax_heat) = plt.subplots(1, 3, figsize=(17, 5))
    for run in runs:
        name = f"{run.name}: {run.label}" if run.label else run.name
        if run.evals:
            steps = [r["step"] for r in run.evals if r.get("eval/reward_accuracy") is not None]
            accs = [r["eval/reward_accuracy"] for r in run.evals if r.get("eval/reward_accuracy") is not None]
            ax_acc.plot(steps, accs, marker="o", label=name)
        if run.train:
            ax_loss.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], label=name)
    _axes(ax_acc, "eval reward accuracy", "eval/reward_accuracy", any(r.evals for r in runs))
    _axes(ax_loss, "train loss", "loss", any(r.train for r in runs))
    _heatmap(ax_heat, runs)
    fig.tight_layout()
    out_path = Path(out_path)
    try:
        fig.savefig(out_path, dpi=100)
    finally:
        plt.close(fig)  # also when the path cannot be written
    return out_path


def _axes(ax, title: str, ylabel: str, has_data: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if has_data:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)


def _heatmap(ax, runs: list[Run]) -> None:
    betas, lrs, grid, counts = heatmap_grid(runs)
    ax.set_title("final eval reward accuracy")
    if not any(c for row in counts for c in row):
        ax.text(0.5, 0.5, "no eval accuracy for any loss.beta x optim.lr", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_xlabel("optim.lr")
    ax.set_ylabel("loss.beta")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            text = "-" if not counts[i][j] else f"{value:.3f}" + (f"\nn={counts[i][j]}" if counts[i][j] > 1 else "")
            ax.text(j, i, text, ha="center", va="center", color="white" if not value > 0.6 else "black")
    ax.figure.colorbar(image, ax=ax)
