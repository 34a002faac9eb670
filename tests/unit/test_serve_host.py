"""dpo-serve --host: the address given is the one the server binds and uvicorn is configured
with (no server runs: the model, the app and uvicorn's Server are stand-ins)."""

from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")


def test_dpo_serve_binds_the_host_it_is_given(tmp_path, monkeypatch):
    import uvicorn

    import dpo_dist.serve as serve_module
    from dpo_dist.distributed import free_port
    from launch.serve import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    seen = {}

    class NoModel:
        def __init__(self, path, name, **kwargs):
            seen["model"] = (path, name)

    class RecordingServer:
        def __init__(self, config):
            seen["config"] = (config.host, config.port)

        def run(self, sockets):
            seen["bound"] = [sock.getsockname()[:2] for sock in sockets]

    monkeypatch.setattr(serve_module, "ServedModel", NoModel)
    monkeypatch.setattr(serve_module, "create_app", lambda served, limits: object())
    monkeypatch.setattr(uvicorn, "Server", RecordingServer)
    port = free_port()
    # 127.0.0.2 is loopback too, but not the default 127.0.0.1: only an honoured --host binds it.
    assert main([str(model_dir), "--host", "127.0.0.2", "--port", str(port)]) == 0
    assert seen["model"] == (str(model_dir), str(model_dir))
    assert seen["config"] == ("127.0.0.2", port)
    assert seen["bound"] == [("127.0.0.2", port)]
