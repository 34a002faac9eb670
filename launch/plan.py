"""``dpo-plan [OVERRIDES...] [--throughput ...]``: per-GPU memory plan of a run, without a GPU.

    dpo-plan model=llama3_70b cluster=slurm cluster.nodes=8 cluster.tasks_per_node=8 cluster.gpus_per_node=8
    dpo-plan experiment=llama3_70b_64gpu --throughput

Same Hydra overrides as ``dpo-train``; every rank is one GPU of ``cluster.gpu_memory_gb``. The model
shape comes from ``model.path``'s ``config.json`` (no weights are read, so a directory holding only
``config.json``, or a ``.json`` file, will do) or, when ``model.path`` is unset, from the preset's
shipped shape (``dpo_dist/assets/model_shapes/<model.name>.json``). Prints the breakdown (see
``dpo_dist.memory``); ``--throughput`` adds the projected step time over a range of GPU counts.

Exit status: 0 the plan fits, 1 it does not (the reason on stderr), 2 a usage or config error.
``dpo-train`` runs the same check (``check_memory_plan``) before launching a GPU job.
"""

from __future__ import annotations

import argparse
import logging
import sys

from launch.common import CONF_DIR, ArgumentParser, UserError, _short_hydra_error, fail, register_schema

log = logging.getLogger("dpo_dist.plan")
PROG = "dpo-plan"


def gpu_counts(text: str) -> list[int]:
    """``--gpus``: comma-separated positive integers, e.g. ``32,64,128``."""
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"GPU counts must be positive, got {text!r}")
    return counts


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--throughput", action="store_true", help="also project step time and MFU per GPU count")
    parser.add_argument("--gpus", type=gpu_counts, default="32,64,128,256,512", help="GPU counts of the projection (comma-separated)")
    parser.add_argument("--tokens-per-pair", type=float, default=2048.0, help="mean real tokens of one pair (chosen + rejected)")
    parser.add_argument("--bandwidth-gbit", type=float, default=400.0, help="network bandwidth per GPU between nodes, Gbit/s")
    parser.add_argument("--overlap", type=float, default=0.8, help="fraction of communication hidden behind compute")
    parser.add_argument("--measured-tokens-per-s", type=float, default=53_900.0, help="single-GPU tokens/s of plain LM training (LM head at every token, no activation recompute, full weights) that calibrates compute")
    parser.add_argument("--measured-model", default="llama3_1b", help="preset shape of that measurement")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, rest


def compose_config(overrides: list[str]):
    """The validated DPOConfig for ``overrides`` and the shape file it plans with.

    A preset without ``model.path`` plans with its shipped shape; the path is filled in only to
    satisfy validation (nothing here loads weights)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from dpo_dist.config import ConfigError, config_from_dict
    from dpo_dist.memory import preset_shape_path

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name="config", overrides=[*overrides, "output_dir=_plan_"])
        values = OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf composition errors
        raise UserError(_short_hydra_error(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    model = values["model"]
    shape_path = model.get("path")
    if not shape_path:
        preset = preset_shape_path(model.get("name", ""))
        if preset is None:
            raise UserError(f"model.path: required for model={model.get('name')} (no shipped shape to plan with)")
        shape_path = model["path"] = str(preset)
    try:
        return config_from_dict(values), shape_path
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def plan_for(cfg, shape_path: str | None = None):
    """(shape, settings, plan) of ``cfg`` on its GPUs; PlanError becomes a UserError."""
    from dpo_dist.config import ConfigError
    from dpo_dist.memory import ModelShape, PlanError, PlanSettings, plan_memory

    try:
        shape = ModelShape.from_path(shape_path or cfg.model.path)
        settings = PlanSettings.from_config(cfg)
        return shape, settings, plan_memory(shape, settings)
    except (PlanError, ConfigError) as exc:
        raise UserError(str(exc)) from None


def is_gpu_run(cfg) -> bool:
    """A run that will train on GPUs: GPUs requested from the cluster, or CUDA on this machine."""
    if cfg.cluster.gpus_per_node > 0:
        return True
    import torch

    return torch.cuda.is_available()


def check_memory_plan(cfg, shape_path: str | None = None) -> None:
    """``dpo-train``'s pre-launch check: raise UserError (one line) if a GPU plan cannot fit.
    ``shape_path``: the model's config.json directory when not ``model.path`` (see ``plan_for``).

    CPU runs, ZeRO stages other than 3 and models the planner cannot describe are not checked
    (a log line says so)."""
    if not is_gpu_run(cfg):
        log.info("memory plan: skipped (CPU run: cluster.gpus_per_node=0 and no CUDA device)")
        return
    if cfg.deepspeed.stage != 3:
        log.info("memory plan: skipped (deepspeed.stage=%d; the planner models ZeRO-3 only)", cfg.deepspeed.stage)
        return
    from dpo_dist.memory import GIB, suggestions

    try:
        shape, settings, plan = plan_for(cfg, shape_path)
    except UserError as exc:  # a shape the planner cannot model (e.g. mixture-of-experts) is not refused
        log.warning("memory plan: not checked: %s", exc)
        return
    if not plan.fits:
        options = suggestions(shape, settings)
        hint = f"; fits with: {' or '.join(options)}" if options else ""
        raise UserError(f"memory plan: {plan.verdict()}{hint} (details: dpo-plan with the same overrides)")
    log.info("memory plan: %s (%.1f GiB forward/backward, %.1f GiB optimizer step)", plan.verdict(), plan.fwd_bwd_peak / GIB, plan.step_peak / GIB)


def throughput_report(args, shape, settings, cfg) -> str:
    from dpo_dist.memory import ThroughputAssumptions, throughput_table

    assumptions = ThroughputAssumptions(
        inter_node_gbit=args.bandwidth_gbit,
        overlap=args.overlap,
        measured_tokens_per_s=args.measured_tokens_per_s,
        measured_shape=args.measured_model,
    )
    tokens = cfg.train.pairs_per_step * args.tokens_per_pair
    header = (
        f"step-time projection: {cfg.train.pairs_per_step} pairs x {args.tokens_per_pair:g} tokens = {tokens:,.0f} tokens/step, "
        f"{args.bandwidth_gbit:g} Gbit/s per GPU between nodes, overlap {args.overlap:g}, "
        f"compute at the measured single-GPU efficiency ({assumptions.efficiency():.2f} of {assumptions.peak_tflops:g} TFLOP/s)"
    )
    return header + "\n" + throughput_table(shape, settings, args.gpus, tokens, args.tokens_per_pair / 2, assumptions)


def run(argv: list[str]) -> int:
    from dpo_dist.memory import PlanError, suggestions

    args, overrides = parse_args(argv)
    cfg, shape_path = compose_config(overrides)
    shape, settings, plan = plan_for(cfg, shape_path)
    print(f"shape: {shape_path}")
    print(plan.report())
    if args.throughput:
        try:
            print("\n" + throughput_report(args, shape, settings, cfg))
        except (PlanError, ValueError) as exc:
            raise UserError(str(exc)) from None
    if plan.fits:
        return 0
    options = suggestions(shape, settings)
    if options:
        print(f"fits with: {' or '.join(options)}")
    print(f"{PROG}: {plan.verdict()}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        fail(PROG, str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
