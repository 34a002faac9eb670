"""One rank of the engine-release test (``test_engine.py::test_discarded_engines_free_their_memory``).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/integration/release_worker.py SPEC

SPEC is a JSON file with ``config`` (a nested run config) and ``out`` (a directory). The rank runs
the precomputed-reference pass the way ``dpo-train`` does, then builds a policy engine, trains one
step and releases it, and writes ``rank<r>.json``: how many DeepSpeed engines and how many bytes of
tensors are still alive after each of those points.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout

from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from dpo_dist import distributed as D  # noqa: E402
from dpo_dist import engine as E  # noqa: E402
from dpo_dist import model as M  # noqa: E402
from dpo_dist.attention import resolve_attn_backend  # noqa: E402
from dpo_dist.config import config_from_dict  # noqa: E402
from tests.helpers import live_tensor_bytes  # noqa: E402


def alive() -> dict:
    """Live DeepSpeed engines and bytes held by live tensors, after a full collection."""
    tensor_bytes = live_tensor_bytes()
    return {"engines": sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects()), "tensor_bytes": tensor_bytes}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(spec["config"])
    env = D.detect_env()
    D.init_distributed(env, 5)
    device = D.device_for(env)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.resolved_tokenizer_path())
    train_data, eval_data = E.load_splits(cfg, tokenizer)
    backend = resolve_attn_backend(cfg.model.attn_backend, device, M.training_dtype(cfg, device))
    report = {"start": alive()}

    reference = E.prepare_reference(cfg, env, device, backend, train_data, eval_data)
    report["after_reference_pass"] = alive()

    engine = M.build_engine(cfg, device, backend)
    ctx = E.StepContext(engine, reference, cfg, device, env.world_size)
    plans = E.plan_micro_batches(
        list(range(cfg.train.pairs_per_step)), train_data.lengths(), env.rank, env.world_size, cfg.train.micro_batch_tokens
    )
    E.train_step(ctx, train_data, plans)
    report["policy_built"] = alive()
    param = weakref.ref(next(engine.module.parameters()))
    M.release_engine(engine)
    del engine, ctx
    M.free_memory()
    report["after_release"] = alive()
    report["parameter_alive"] = param() is not None
    Path(spec["out"], f"rank{env.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
