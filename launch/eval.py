"""``dpo-eval``: reward accuracy and margins of a trained policy on held-out pairs.

    dpo-eval eval.policy_path=outputs/RUN/final [same model/data overrides as the training run]

The reference is ``model.path`` (its cached log-probs are reused); results land in
``output_dir/eval.json`` and are logged.
"""

from __future__ import annotations

from launch.common import hydra_main, to_config
from launch.run import launch


def _task(cfg) -> None:
    launch("dpo-eval", to_config(cfg), "eval")


def main() -> None:
    hydra_main("dpo-eval", _task)


if __name__ == "__main__":
    main()
