"""``dpo-train``: DPO (or SFT with stage=sft) with Hydra overrides; ``-m`` runs sweeps."""

from __future__ import annotations

from launch.common import hydra_main, to_config
from launch.plan import check_memory_plan
from launch.run import launch


def _task(cfg) -> None:
    config = to_config(cfg)
    check_memory_plan(config)  # a GPU plan that cannot fit is refused before anything starts
    launch("dpo-train", config, "train")


def main() -> None:
    hydra_main("dpo-train", _task)


if __name__ == "__main__":
    main()
