"""``dpo-export CKPT [--out DIR] [--dtype auto|fp32|bf16|fp16]``: a checkpoint -> Hugging Face model.

CKPT is a run directory (newest complete checkpoint), its ``checkpoints/`` folder, or one
checkpoint folder (``checkpoints/step_00000040``). The default ``--out`` is
``RUN_DIR/export/<tag>``.
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    from dpo_dist.export import ExportError, export_checkpoint, resolve_checkpoint

    try:
        _, tag, run_dir = resolve_checkpoint(args.checkpoint)
        out = export_checkpoint(args.checkpoint, args.out or run_dir / "export" / tag, args.dtype)
    except (ExportError, FileNotFoundError) as exc:
        print(f"dpo-export: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
