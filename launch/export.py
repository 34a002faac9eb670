"""``dpo-export CKPT [--out DIR] [--dtype auto|fp32|bf16|fp16] [--max-shard-size 5GB]``: a checkpoint -> Hugging Face model.

CKPT is a run directory (newest complete checkpoint), its ``checkpoints/`` folder, or one
checkpoint folder (``checkpoints/step_00000040``). The default ``--out`` is
``RUN_DIR/export/<tag>``. Host memory stays near one shard (``--max-shard-size``) whatever the
model size: the partitions are memory-mapped and written shard by shard.
"""

from __future__ import annotations

import logging
import sys

from launch.common import ArgumentParser


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="dpo-export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one checkpoint dir")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/export/<tag>)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument(
        "--max-shard-size", help="largest safetensors file, e.g. 500MB (default: 5GB, as save_pretrained)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    from dpo_dist.export import (
        DEFAULT_MAX_SHARD_SIZE,
        ExportError,
        export_checkpoint,
        parse_shard_size,
        resolve_checkpoint,
    )

    if args.max_shard_size is not None:
        try:
            parse_shard_size(args.max_shard_size)
        except ExportError as exc:
            print(f"dpo-export: error: --max-shard-size {args.max_shard_size}: {exc}", file=sys.stderr)
            return 2
    try:
        _, tag, run_dir = resolve_checkpoint(args.checkpoint)
        out = export_checkpoint(
            args.checkpoint,
            args.out or run_dir / "export" / tag,
            args.dtype,
            args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
        )
    except (ExportError, OSError, ValueError) as exc:  # OSError: e.g. the run's model.path has moved
        print(f"dpo-export: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
