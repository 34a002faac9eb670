"""``dpo-serve`` as a real HTTP server in a subprocess, driven by httpx (a bounded set of requests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from dpo_dist.distributed import free_port
from tests.helpers import REPO, make_tiny_model_dir, run_cli

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.integration

NAME = "tiny-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_model_dir(tmp_path_factory.mktemp("serve") / "model", layers=1)
    port = free_port()
    cmd = [
        sys.executable, "-m", "launch.serve", str(model), "--port", str(port), "--served-model-name", NAME,
        "--max-tokens", "32", "--max-prompt-tokens", "64", "--max-body-bytes", "4096",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait_ready(client, proc)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(client, proc, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dpo-serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("dpo-serve did not become ready")


def test_models(server):
    body = server.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [NAME]


def test_completions_greedy_usage_and_stop(server):
    request = {"model": NAME, "prompt": "12+34=", "max_tokens": 8, "temperature": 0}
    first = server.post("/v1/completions", json=request).json()
    assert first["object"] == "text_completion" and first["model"] == NAME
    choice = first["choices"][0]
    assert first["usage"]["prompt_tokens"] == 7  # BOS + 6 characters
    assert 1 <= first["usage"]["completion_tokens"] <= 8
    assert first["usage"]["total_tokens"] == 7 + first["usage"]["completion_tokens"]
    assert choice["finish_reason"] in ("stop", "length")
    text = choice["text"]
    assert len(text) >= 3, text  # a random model rarely ends within 3 tokens; keep the stop check meaningful
    stop = text[2]
    stopped = server.post("/v1/completions", json={**request, "stop": [stop]}).json()["choices"][0]
    assert stopped == {**choice, "text": text[: text.index(stop)], "finish_reason": "stop"}


def test_chat_sampling_is_repeatable_with_a_seed(server):
    request = {
        "model": NAME, "messages": [{"role": "user", "content": "reverse: abc"}], "max_tokens": 6,
        "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 2,
    }
    first = server.post("/v1/chat/completions", json=request).json()
    again = server.post("/v1/chat/completions", json=request).json()
    assert first["object"] == "chat.completion" and len(first["choices"]) == 2
    assert [c["message"] for c in first["choices"]] == [c["message"] for c in again["choices"]]
    # It does sample (a random model's next-token distribution is nearly flat over ~100 tokens).
    assert first["choices"][0]["message"] != first["choices"][1]["message"]
    other = server.post("/v1/chat/completions", json={**request, "seed": 8}).json()
    assert [c["message"] for c in other["choices"]] != [c["message"] for c in first["choices"]]
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert first["usage"]["prompt_tokens"] > len("reverse: abc")  # the chat template adds role markers


def test_max_completion_tokens_is_max_tokens_and_wins(server):
    """Current OpenAI clients send max_completion_tokens for chat; it wins over max_tokens."""
    request = {"model": NAME, "messages": [{"role": "user", "content": "12+34="}], "temperature": 0}
    newer = server.post("/v1/chat/completions", json={**request, "max_tokens": 8, "max_completion_tokens": 2}).json()
    older = server.post("/v1/chat/completions", json={**request, "max_tokens": 2}).json()
    assert newer["choices"] == older["choices"] and newer["usage"] == older["usage"]
    assert newer["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize(
    "path, payload, status, fragment",
    [
        ("/v1/completions", b'{"model": "tiny-test", "prompt": ', 400, "not valid JSON"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model 'gpt-4' not found"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 33}, 400, "over this server's limit of 32"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 33},
         400, "max_completion_tokens=33 is over this server's limit of 32"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
         400, "max_completion_tokens"),
        ("/v1/completions", {"model": NAME, "prompt": "x" * 100}, 400, "accepts at most 64"),
        ("/v1/completions", {"model": NAME, "prompt": "x" * 5000}, 413, "request body over 4096 bytes"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        # Beyond torch.manual_seed's range: refused, not a 500 from torch.
        ("/v1/completions", {"model": NAME, "prompt": "hi", "seed": 99999999999999999999}, 400, "seed: Input should be"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "seed": -(1 << 64)},
         400, "seed: Input should be"),
        ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "unknown chat role"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tokenize": True}},
         400, "chat_template_kwargs: may not set tokenize"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]},
         400, "chat_template_kwargs"),
    ],
)
def test_bad_requests_are_refused(server, path, payload, status, fragment):
    if isinstance(payload, bytes):
        response = server.post(path, content=payload, headers={"Content-Type": "application/json"})
    else:
        response = server.post(path, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def test_bad_model_dir_is_one_line_exit_2(tmp_path):
    result = run_cli("launch.serve", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"dpo-serve: error: {tmp_path}: not a Hugging Face model directory (no config.json)"


def test_model_dir_without_tokenizer_or_weights_is_one_line_exit_2(tmp_path):
    """config.json alone passes the directory check; loading then fails in one line, before serving."""
    import shutil

    model = make_tiny_model_dir(tmp_path / "model", layers=1)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(model / "config.json", config_only)
    result = run_cli("launch.serve", str(config_only), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"dpo-serve: error: {config_only}: cannot load its tokenizer: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_lora_adapter_directory_is_served_merged_on_its_base(tmp_path):
    """An adapter-only export (model.lora.merge_on_export=false) passes dpo-serve's directory check
    and is served as its base with the adapter merged: the PEFT model's greedy answer."""
    from dpo_dist.generation import SamplingParams, generate_texts, load_tokenizer
    from dpo_dist.serve import ServedModel
    from tests.unit.test_generation import make_tiny_adapter_dir

    base = make_tiny_model_dir(tmp_path / "base", layers=1)
    adapter = tmp_path / "adapter"
    peft_model = make_tiny_adapter_dir(base, adapter)
    with socket.socket() as taken:  # the check passes: the next error is the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("launch.serve", str(adapter), "--port", str(port))
    assert result.returncode == 2 and "cannot listen on" in result.stderr, result.stderr[-2000:]
    served = ServedModel(adapter, NAME)
    greedy = SamplingParams(max_new_tokens=8)
    expected = generate_texts(peft_model, load_tokenizer(adapter), ["12+34="], greedy, batch_size=1)
    assert [c.text for c in served.generate([served.encode("12+34=")], greedy, seed=None)] == [c.text for c in expected]


def test_port_in_use_is_one_line_exit_2(tmp_path):
    """Checked before the model is loaded, and reported like the other usage errors."""
    model = make_tiny_model_dir(tmp_path / "model", layers=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("launch.serve", str(model), "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"dpo-serve: error: cannot listen on 127.0.0.1:{port}: address already in use (choose another --port)"
    )


def test_device_map_spreads_layers_and_answers_alike(tmp_path, monkeypatch):
    """--device-map (Accelerate's layer placement, for models one GPU cannot hold) reaches
    from_pretrained and serves the same greedy answer as the whole model on one device; on this
    CPU-only machine every layer lands on cpu."""
    from transformers import AutoModelForCausalLM

    from dpo_dist.generation import SamplingParams
    from dpo_dist.serve import ServedModel

    maps, load = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: maps.append(kw.get("device_map")) or load(*a, **kw))
    model = make_tiny_model_dir(tmp_path / "model", layers=1)
    whole, spread = ServedModel(model, NAME), ServedModel(model, NAME, device_map="auto")
    assert maps == [None, "auto"]
    assert {str(p.device) for p in spread.model.parameters()} == {"cpu"}
    ids = [whole.encode("12+34=")]
    greedy = SamplingParams(max_new_tokens=8)
    assert [c.text for c in spread.generate(ids, greedy, seed=None)] == [c.text for c in whole.generate(ids, greedy, seed=None)]
