"""The workflow pieces on the bundled tiny model and data (the README's commands, shortened).

Training, eval, win-rate and report on the bundled model are in test_engine's default-config test;
here: the data audit, generating preference pairs with the task's verifier as judge, and serving.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dpo_dist.config import ASSETS_DIR
from dpo_dist.data import read_preferences
from dpo_dist.distributed import free_port
from dpo_dist.tasks import verify
from tests.helpers import REPO, run_cli
from tests.integration.test_serve import _wait_ready

pytestmark = pytest.mark.integration

MODEL, TRAIN, EVAL = ASSETS_DIR / "tiny_model", ASSETS_DIR / "data" / "train.jsonl", ASSETS_DIR / "data" / "eval.jsonl"


def test_audit_of_the_bundled_data(tmp_path):
    result = run_cli("launch.data", "audit", str(TRAIN), "--eval", str(EVAL), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    counts = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    for check in ("duplicates", "near_duplicates", "leakage", "identical_responses", "truncated"):
        assert counts[check] == "0", (check, counts)  # the generator guarantees these
    assert (tmp_path / "audit.md").exists() and (tmp_path / "audit.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_pairs_from_the_bundled_model_with_the_rule_judge(tmp_path):
    out = tmp_path / "generated.jsonl"
    result = run_cli(
        "launch.data", "generate", "--model", str(MODEL), "--prompts", str(EVAL), "--out", str(out),
        "--num-samples", "4", "--judge", "rule", "--max-prompts", "24", "--max-new-tokens", "8",
        "--temperature", "1.0", "--seed", "0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = read_preferences(out)
    assert written.records and not written.problems  # the SFT model is right sometimes, wrong sometimes
    for record in written.records:  # a verified answer beats an unverified one
        assert verify(record.prompt, record.chosen) and not verify(record.prompt, record.rejected)


def test_serve_the_bundled_model(tmp_path):
    httpx = pytest.importorskip("httpx")
    port = free_port()
    cmd = [sys.executable, "-m", "launch.serve", str(MODEL), "--port", str(port), "--served-model-name", "tiny"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait_ready(client, proc)
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "47+38=", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["text"].strip() == "85"  # greedy answer of the bundled SFT model
        assert body["usage"]["completion_tokens"] >= 2
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=15)
