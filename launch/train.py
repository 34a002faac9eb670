"""``dpo-train``: DPO (or SFT with stage=sft) with Hydra overrides; ``-m`` runs sweeps."""

from __future__ import annotations

from launch.common import hydra_main, to_config
from launch.run import launch


def _task(cfg) -> None:
    launch("dpo-train", to_config(cfg), "train")


def main() -> None:
    hydra_main("dpo-train", _task)


if __name__ == "__main__":
    main()
