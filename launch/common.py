"""Shared plumbing of the Hydra entry points: schema registration, one-line errors, run dirs.

Every console script that reads the config tree goes through ``hydra_main``: it checks the
command-line overrides against the typed schema first (so an unknown key or a bad value is one
line on stderr and exit status 2, never a traceback), then hands over to Hydra, which handles
``-m`` sweeps and launcher plugins.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

CONF_DIR = Path(os.environ.get("DPO_DIST_CONF", Path(__file__).resolve().parent.parent / "conf"))

log = logging.getLogger("dpo_dist")


class UserError(Exception):
    """An error the user can fix (bad config, missing file, bad data); printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``prog: error: message (see --help)``, exit status 2.

    Sub-command parsers made by ``add_subparsers`` are of this class too (argparse's default)."""

    def error(self, message: str):  # type: ignore[override]
        text = " ".join(str(message).split())
        print(f"{self.prog}: error: {text} (see --help)", file=sys.stderr)
        sys.exit(2)


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from dpo_dist.config import DPOConfig

    ConfigStore.instance().store(name="dpo_schema", node=DPOConfig)


def fail(prog: str, message: str, status: int = 2) -> None:
    """Print ``prog: error: message`` (first line only) and exit."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    print(f"{prog}: error: {first}", file=sys.stderr)
    sys.exit(status)


_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--info", "-i", "--experimental-rerun")
"""Hydra's flags that take the next word as their value (``--cfg job``, ``-cn NAME``)."""


def check_words(prog: str, argv: list[str]) -> None:
    """Exit 2 with one line on a word that is neither an override nor a Hydra flag (``dpo-train
    train``, ``loss.beta = 0.5``): Hydra would answer with a multi-line grammar error."""
    for before, word in zip([None, *argv], argv):
        if word.startswith(("-", "~")) or "=" in word or before in _VALUE_FLAGS:  # ~key deletes a key
            continue
        fail(prog, f"{word!r} is not an override: write key=value, without spaces around '=' (e.g. loss.beta=0.5)")


def _config_overrides(argv: list[str]) -> tuple[list[str], bool]:
    """The key=value overrides in argv (Hydra flags removed) and whether -m/--multirun was given."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    return overrides, multirun


def parse_overrides(prog: str, overrides: list[str]) -> list:
    """Hydra's ``Override`` for each of ``overrides``, in order; exit 2 with one line on a bad one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra's grammar errors are multi-line
        fail(prog, f"bad override: {exc}")


def check_overrides(
    prog: str,
    overrides: list[str],
    config_name: str = "config",
    parsed: list | None = None,
    preflight: Callable | None = None,
    validate: bool = True,
) -> list:
    """Compose the config for every sweep combination and validate it; exit 2 with one line on error.

    ``parsed`` is ``parse_overrides(prog, overrides)`` where the caller has it already.
    ``preflight(DPOConfig)`` runs on every combination too (it raises UserError to refuse).
    ``validate=False`` (``--cfg``): composition errors only (unknown keys, values of the wrong type),
    so a config still missing e.g. ``model.path`` can be printed to be filled in.
    Returns the ``ClusterConfig`` of every combination (a sweep's launcher depends on them; none
    without ``validate``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from dpo_dist.config import ConfigError, config_from_dict

    if parsed is None:
        parsed = parse_overrides(prog, overrides)
    choices = []
    for override, raw in zip(parsed, overrides):
        if override.get_key_element().lstrip("+~").startswith("hydra."):
            continue  # Hydra's own settings (e.g. hydra.launcher.*, absent from the basic launcher composed here)
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([raw])
    clusters = []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for index, combo in enumerate(itertools.product(*choices)):  # Hydra's job numbers, in its order
            where = sweep_point_dir(overrides, parsed, list(combo), index) if preflight is not None else None
            try:
                cfg = compose(config_name=config_name, overrides=[*combo, f"output_dir={where or '_check_'}"])
                if not validate:
                    continue
                checked = config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
                clusters.append(checked.cluster)
                if preflight is not None:
                    preflight(checked)
            except (ConfigError, UserError) as exc:
                fail(prog, str(exc))
            except Exception as exc:  # noqa: BLE001 - composition errors from Hydra/OmegaConf
                fail(prog, _short_hydra_error(exc))
    GlobalHydra.instance().clear()
    return clusters


def sweep_point_dir(overrides: list[str], parsed: list, combo: list[str], index: int) -> str | None:
    """The ``output_dir`` of sweep point ``index`` (Hydra's job number) with overrides ``combo``,
    where the command fixes it: its own value of a swept ``output_dir=a,b``, else ``D/index`` for
    ``hydra.sweep.dir=D`` or ``output_dir=D`` (``hydra_main`` hands the latter to Hydra as the
    former; Hydra's own, given later, wins). None where Hydra picks a new directory (the default
    ``multirun/DATE/TIME``) or the command changes ``hydra.sweep.subdir``."""
    def last(key: str) -> int | None:
        return max((i for i, o in enumerate(parsed) if o.get_key_element().lstrip("+") == key), default=None)

    if last("hydra.sweep.subdir") is not None:
        return None
    sweep_dir, output_dir = last("hydra.sweep.dir"), last("output_dir")
    if output_dir is not None and parsed[output_dir].is_sweep_override():
        return next(o.split("=", 1)[1] for o in reversed(combo) if o.startswith("output_dir="))
    chosen = sweep_dir if sweep_dir is not None else output_dir
    if chosen is None:
        return None
    root = overrides[chosen].split("=", 1)[1]
    return None if "${now:" in root else f"{root.rstrip('/')}/{index}"


def slurm_sweep_arguments(prog: str, overrides: list[str], parsed: list, clusters: list) -> list[str]:
    """Extra Hydra arguments for a ``-m`` sweep on Slurm: hydra-submitit-launcher (one job array),
    with each job's resources from ``cluster.*`` exactly as for a single ``cluster=slurm`` job.
    ``parsed`` is ``parse_overrides(prog, overrides)``.

    ``cluster`` is an ordinary config group, and a group cannot select Hydra's launcher, so the
    choice is made here, from the composed configs (see slurm/submit.py).
    """
    names = {cluster.name for cluster in clusters}
    if "slurm" not in names:
        return []
    if len(names) > 1:
        fail(prog, "a sweep runs on one cluster: it cannot mix cluster=local and cluster=slurm")
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override() and key.split(".")[0] == "cluster":
            fail(prog, f"{key} is swept, but one Slurm job array has one resource shape: run one sweep per value")
    from slurm.submit import launcher_overrides, report_sweep_failures

    report_sweep_failures(lambda message: fail(prog, message, status=1))
    chosen = any(o.split("=", 1)[0].lstrip("+~") == "hydra/launcher" for o in overrides)
    return ([] if chosen else ["hydra/launcher=dpo_slurm"]) + launcher_overrides(clusters[0])


def _short_hydra_error(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the informative ones on one line.

    Hydra wraps the useful part: ``Error merging override train.max_steps=abc`` has OmegaConf's
    ``Value 'abc' could not be converted to Integer ... full_key: train.max_steps`` as its cause,
    so the causes' lines follow, after a colon."""
    parts: list[str] = []
    seen: set[int] = set()
    name = type(exc).__name__
    while exc is not None and id(exc) not in seen and len(parts) < 4:
        seen.add(id(exc))
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # Hydra appends its search path (provider=..., path=...) to "Could not find" errors: noise.
        lines = lines[: next((i for i, ln in enumerate(lines) if ln.startswith("Config search path")), len(lines))]
        keep = [ln for ln in lines if not ln.startswith(("object_type", "reference_type", "Set the environment"))]
        text = " ".join(f"({ln})" if ln.startswith("full_key:") else ln for ln in keep)
        if text and not any(text in part for part in parts):
            parts.append(text)
        exc = exc.__cause__
    return ": ".join(parts) or name


def hydra_main(
    prog: str, task: Callable, config_name: str = "config", sweep_preflight: Callable | None = None, trains: bool = False
) -> None:
    """Run ``task(cfg: DictConfig)`` as a Hydra app after validating the command line.

    ``sweep_preflight(DPOConfig)``: with ``-m``, run on every point before anything is submitted
    (a Slurm array's points run ``task`` inside their jobs, after waiting for the allocation).
    ``trains``: the task trains into ``output_dir``: refuse at once (before Hydra writes its files
    there, before a Slurm job is queued) one that another training job holds."""
    import hydra

    from dpo_dist.runinfo import record_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    register_schema()
    argv = sys.argv[1:]
    record_command([prog, *argv])
    check_words(prog, argv)
    overrides, multirun = _config_overrides(argv)
    # argparse takes one run of positional overrides: ours and the user's together, and the
    # user's flags (with their values, e.g. `-m`, `--cfg job`) after them, never in between.
    flags = [a for a in argv if a not in overrides]
    parsed = parse_overrides(prog, overrides)  # once: composing, the launcher and output_dir need it
    swept = [raw for raw, override in zip(overrides, parsed) if override.is_sweep_override()]
    if swept and not multirun:
        fail(prog, f"{swept[0]} is a sweep (several values): add -m to run one job per value")
    last = max((i for i, raw in enumerate(overrides) if raw.startswith("output_dir=")), default=None)
    if last is not None and not overrides[last].split("=", 1)[1].strip():
        fail(prog, "output_dir is empty: give the run a directory (it would train into the current one)")
    if last is not None and not multirun:
        given = Path(overrides[last].split("=", 1)[1])
        if given.exists() and not given.is_dir():
            fail(prog, f"output_dir={given}: exists and is not a directory")
    clusters: list = []
    printing = any(a in ("--cfg", "-c") for a in argv)  # prints the config and exits: nothing to preflight
    if multirun and (printing or any(a in ("--info", "-i") for a in argv)):
        fail(prog, "-m cannot be combined with --cfg or --info (Hydra runs one mode): leave out -m and give one value per key")
    informing = any(a in ("--help", "-h", "--info", "--hydra-help") for a in argv)  # nothing runs
    if not informing:
        preflight = sweep_preflight if multirun else None
        clusters = check_overrides(prog, overrides, config_name, parsed, preflight, validate=not printing)
    if last is not None and not (printing or informing):
        given = overrides[last].split("=", 1)[1]
        make_directory(prog, given, "output_dir")
        if trains and not multirun and not any(c in given for c in "${},"):
            check_not_held(prog, given)
    extra = [f"hydra.job.name={prog}"]
    if multirun:
        extra += slurm_sweep_arguments(prog, overrides, parsed, clusters)
    output_dir = None if last is None else overrides[last].split("=", 1)[1]  # the last one wins
    if output_dir is not None and not multirun:
        # A single run's Hydra directory is its output_dir, so re-running a command resumes in place.
        extra.append(f"hydra.run.dir={output_dir}")
    elif output_dir is not None and not parsed[last].is_sweep_override():
        # In a sweep, output_dir=X given to every point as is would make the second point
        # "resume" the first's finished run and export its model as its own. X is the sweep
        # directory instead: point N's output_dir is X/N, as in the default multirun/DATE/TIME/N.
        # (A swept output_dir=a,b gives each point its own.)
        extra.append(f"hydra.sweep.dir={output_dir}")
        overrides = [o for o in overrides if not o.startswith("output_dir=")]
    sys.argv[:] = [prog, *extra, *overrides, *flags]

    # A local sweep runs its points here one after another and goes on past a failed one, as a
    # Slurm array does; a Slurm sweep's points fail their own jobs (this closure runs inside them,
    # with keep_going as decided here), which slurm.submit reports.
    keep_going = multirun and all(cluster.name == "local" for cluster in clusters)
    points: list[str | None] = []  # per point run here: None, or how it failed

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def _app(cfg):
        points.append(None)
        try:
            return task(cfg)
        except UserError as exc:
            if not keep_going:
                fail(prog, str(exc))
            points[-1] = _failed_point(prog, str(exc))
        except SystemExit as exc:  # a point's ranks failed (fail() printed why); preemption stops the sweep
            from dpo_dist.worker import PREEMPTED_EXIT_CODE

            if not keep_going or exc.code in (0, None, PREEMPTED_EXIT_CODE):
                raise
            points[-1] = _failed_point(prog, f"exit status {exc.code}")

    _app()
    failed = [point for point in points if point]
    if failed:
        fail(prog, f"{len(failed)} of {len(points)} sweep points failed: {'; '.join(failed)}", status=1)


def _failed_point(prog: str, why: str) -> str:
    """Log a local sweep point's failure (its number and swept values) and describe it in a few words."""
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get().job
    point = f"point {job.num} ({' '.join(job.override_dirname.split(',')) or 'defaults'})"
    print(f"{prog}: error: {point}: {why}; going on with the other points", file=sys.stderr)
    return point


def check_not_held(prog: str, output_dir: str) -> None:
    """Exit 2 with one line if another training job holds ``output_dir`` (``runinfo.RunLock``):
    taken and released at once; the job's own launcher or rank 0 takes it for the run."""
    from dpo_dist.config import ConfigError
    from dpo_dist.runinfo import RunLock

    try:
        RunLock(output_dir, requeue_wait_s=0).acquire().release()
    except ConfigError as exc:
        fail(prog, str(exc))


def make_directory(prog: str, path: str, key: str) -> None:
    """Create ``path`` (a run or sweep directory) now, or exit 2 with one line saying why not:
    Hydra creates it later with a traceback."""
    if any(c in path for c in "${},"):
        return  # an interpolation or a swept value: each point's directory is made by its run
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(prog, f"{key}={path}: cannot create it ({exc.strerror or exc})")


def to_config(cfg):
    """A validated DPOConfig from the composed Hydra config (raises UserError with one line)."""
    from omegaconf import OmegaConf

    from dpo_dist.config import ConfigError, config_from_dict

    try:
        return config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - OmegaConf's missing/interpolation errors
        raise UserError(_short_hydra_error(exc)) from None
