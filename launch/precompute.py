"""``dpo-precompute``: the reference pass alone, into ``reference.cache_dir`` (Arrow shards + manifest).

Same config tree and overrides as ``dpo-train``; a training run with the same model, tokenizer,
data and tokenization settings then reuses the cache (beta and lr are not part of its key).
"""

from __future__ import annotations

from launch.common import UserError, hydra_main, to_config
from launch.run import launch


def _task(cfg) -> None:
    config = to_config(cfg)
    if config.stage == "dpo" and config.sft_first.max_steps > 0:
        raise UserError(
            "sft_first: the DPO stage's reference is the SFT stage's export, which does not exist yet; "
            "dpo-train computes it after the SFT stage (or precompute then with "
            "sft_first.max_steps=0 model.path=OUTPUT_DIR/sft/final)"
        )
    launch("dpo-precompute", config, "precompute")


def main() -> None:
    hydra_main("dpo-precompute", _task)


if __name__ == "__main__":
    main()
