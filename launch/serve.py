"""``dpo-serve``: an OpenAI-compatible HTTP endpoint for a local Hugging Face model.

    dpo-serve outputs/RUN/final [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]

Clients call ``http://HOST:PORT/v1/completions`` or ``/v1/chat/completions`` with
``"model": NAME`` (default: MODEL_DIR as given, like vLLM). Needs the ``serve`` extra
(``pip install 'dpo_dist[serve]'``). Bad arguments (a port already in use too) are one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from launch.common import ArgumentParser

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dpo-serve", description="Serve a local model over an OpenAI-compatible API.")
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="Hugging Face model directory (e.g. a run's final/) or LoRA adapter directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--served-model-name", metavar="NAME", default=None, help="the model id clients send")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device-map", choices=("auto", "balanced", "sequential"), default=None,
                        help="spread the layers over all visible GPUs (for a model one GPU cannot hold, e.g. 70B); "
                             "default: the whole model on one device")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, metavar="N", help="longest prompt accepted")
    parser.add_argument("--max-tokens", type=int, default=512, metavar="N", help="largest max_tokens accepted")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N", help="largest request body (413 above)")
    return parser


def fail(message: str) -> int:
    print(f"dpo-serve: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model_dir)
    # A LoRA adapter directory (adapter_config.json) is served on its base, merged.
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        return fail(f"{args.model_dir}: not a Hugging Face model directory (no config.json)")
    if not 1 <= args.port <= 65535:
        return fail(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_prompt_tokens", "max_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return fail(f"dpo-serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'dpo_dist[serve]'")
    from dpo_dist.generation import GenerationError
    from dpo_dist.serve import ServeError, ServeLimits, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = ServeLimits(args.max_prompt_tokens, args.max_tokens, args.max_body_bytes)
    try:
        serve(args.model_dir, host=args.host, port=args.port, name=args.served_model_name or args.model_dir,
              limits=limits, dtype=args.dtype, device_map=args.device_map)
    except (GenerationError, ServeError, OSError) as e:
        return fail(" ".join(str(e).split()) or type(e).__name__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
