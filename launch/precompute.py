"""``dpo-precompute``: the reference pass alone, into ``reference.cache_dir`` (Arrow shards + manifest).

Same config tree and overrides as ``dpo-train``; a training run with the same model, tokenizer,
data and tokenization settings then reuses the cache (beta and lr are not part of its key).
"""

from __future__ import annotations

from launch.common import hydra_main, to_config
from launch.run import launch


def _task(cfg) -> None:
    launch("dpo-precompute", to_config(cfg), "precompute")


def main() -> None:
    hydra_main("dpo-precompute", _task)


if __name__ == "__main__":
    main()
