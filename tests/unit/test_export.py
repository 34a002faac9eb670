"""dpo_dist.export.save_consolidated: a checkpoint's weights -> a sharded Hugging Face model,
one shard in memory at a time (a 70B checkpoint's fp32 weights do not fit in host memory)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dpo_dist import export
from dpo_dist.export import ExportError, export_checkpoint, save_consolidated
from launch.export import main as export_main
from tests.unit.tiny_models import seeded, tiny_llama_config


class LazyTensor:
    """Stands in for zero_to_fp32's lazy tensor: gathered only by ``contiguous()``, which is logged."""

    def __init__(self, name: str, tensor: torch.Tensor, events: list):
        self.name, self.tensor, self.events = name, tensor, events
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def contiguous(self) -> torch.Tensor:
        self.events.append(("gather", self.name))
        return self.tensor.clone()


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_export_loads_back_as_the_same_model(tmp_path, tied):
    model = seeded(LlamaForCausalLM, tiny_llama_config(tie_word_embeddings=tied))
    save_consolidated(model.state_dict(), model.config, torch.float32, tmp_path, max_shard_size="40KB")

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / name).exists() for name in shards)
    # A tied lm_head is not written (save_pretrained's layout): loading ties it back.
    assert ("lm_head.weight" in index["weight_map"]) is not tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_export_dtype_is_written_and_recorded(tmp_path):
    model = seeded(LlamaForCausalLM, tiny_llama_config())
    save_consolidated(model.state_dict(), model.config, torch.bfloat16, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()  # one shard: no index
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    want = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)


def test_tensors_are_gathered_one_shard_at_a_time(tmp_path, monkeypatch):
    events: list = []
    model = seeded(LlamaForCausalLM, tiny_llama_config())
    lazy = {name: LazyTensor(name, t, events) for name, t in model.state_dict().items()}
    real_save = safetensors.torch.save_file

    def logged_save(tensors, path, metadata=None):
        events.append(("save", sorted(tensors)))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", logged_save)
    save_consolidated(lazy, model.config, torch.float32, tmp_path, max_shard_size="40KB")

    saves = [i for i, event in enumerate(events) if event[0] == "save"]
    assert len(saves) > 2
    start = 0
    for end in saves:  # between two saves, exactly the next shard's tensors are gathered
        assert sorted(name for _, name in events[start:end]) == events[end][1]
        start = end + 1
    assert start == len(events)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model))


def test_weights_that_do_not_match_the_model_are_refused(tmp_path):
    model = seeded(LlamaForCausalLM, tiny_llama_config())
    weights = model.state_dict()
    missing = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(ExportError, match=r"missing \['model.norm.weight'\]"):
        save_consolidated(missing, model.config, torch.float32, tmp_path / "a")
    extra = {**weights, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}
    with pytest.raises(ExportError, match=r"unexpected \['model.layers.9.mlp.up_proj.weight'\]"):
        save_consolidated(extra, model.config, torch.float32, tmp_path / "b")
    resized = {**weights, "model.norm.weight": torch.zeros(3)}
    with pytest.raises(ExportError, match=r"model.norm.weight: checkpoint shape \(3,\), model \(64,\)"):
        save_consolidated(resized, model.config, torch.float32, tmp_path / "c")
    assert export.DEFAULT_MAX_SHARD_SIZE == "5GB"


def test_the_base_models_generation_config_is_kept(tmp_path):
    """A base that stops at more than its EOS (Llama 3 Instruct: <|eot_id|>) keeps doing so."""
    from transformers import GenerationConfig

    from dpo_dist.export import base_generation_config

    model = seeded(LlamaForCausalLM, tiny_llama_config(eos_token_id=2))
    model.config.save_pretrained(tmp_path / "plain")
    assert base_generation_config(str(tmp_path / "plain"), model.config).eos_token_id == 2
    model.config.save_pretrained(tmp_path / "chat")
    GenerationConfig(eos_token_id=[2, 7], do_sample=True, temperature=0.6).save_pretrained(tmp_path / "chat")
    kept = base_generation_config(str(tmp_path / "chat"), model.config)
    assert kept.eos_token_id == [2, 7] and kept.temperature == 0.6


# ---- dpo-export's one-line errors ------------------------------------------------------------------


def test_a_missing_path_and_a_run_without_checkpoints_say_so(tmp_path, capsys):
    missing = tmp_path / "nope_dir"
    assert export_main([str(missing)]) == 2
    assert capsys.readouterr().err == f"dpo-export: error: {missing}: does not exist\n"
    run = tmp_path / "run"  # a run that has not saved a checkpoint yet
    run.mkdir()
    (run / "config.yaml").write_text("stage: dpo\n")
    assert export_main([str(run)]) == 2
    run = run.resolve()
    assert capsys.readouterr().err == f"dpo-export: error: {run}: no checkpoints under {run / 'checkpoints'}\n"
    (tmp_path / "step_1").mkdir()  # a folder that is neither: still the checkpoint message
    assert export_main([str(tmp_path / "step_1")]) == 2
    assert "not a complete dpo_dist checkpoint (no COMPLETE marker)" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["lots", "5XB", "0GB", "-1MB", "GB"])
def test_a_bad_max_shard_size_is_refused_before_any_work(tmp_path, capsys, monkeypatch, size):
    """Checked up front: the shard writer reads it only after the whole checkpoint is consolidated."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr(export, "resolve_checkpoint", must_not_run)
    monkeypatch.setattr(export, "export_checkpoint", must_not_run)
    assert export_main([str(tmp_path), f"--max-shard-size={size}"]) == 2
    hint = "not a size: give a positive number and a unit (KB, MB, GB or TB), e.g. 5GB"
    assert capsys.readouterr().err == f"dpo-export: error: --max-shard-size {size}: {hint}\n"
    with pytest.raises(ExportError) as info:
        export_checkpoint(tmp_path, tmp_path / "out", max_shard_size=size)
    assert str(info.value) == f"max_shard_size={size!r}: {hint}"
    assert export.parse_shard_size("500MB") == 500 * 10**6 and export.parse_shard_size("5gb") == 5 * 10**9
