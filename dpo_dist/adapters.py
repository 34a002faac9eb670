"""PEFT adapter directories (``adapter_config.json``) where a model directory is expected.

A LoRA run exported with ``model.lora.merge_on_export=false``, or an SFT adapter saved by TRL or
PEFT, is such a directory: as ``model.path`` it is the adapter that training continues
(``config.LoraConfig.continued``), and references, evaluations and generation load it onto its base
model. The base is the one its ``base_model_name_or_path`` names: a local directory (a relative
path is read from the current directory, as PEFT reads it, then from the adapter's own directory)
or a Hugging Face Hub id already in the local cache. Nothing is downloaded: a base that is not
here is one ``ConfigError`` line naming the file to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_dist.config import ADAPTER_CONFIG, ConfigError


def is_adapter_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return bool(path) and (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of adapter directory ``path``."""
    file = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        values = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: unreadable ({' '.join(str(exc).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: not a JSON object")
    return values


@dataclass(frozen=True)
class AdapterBase:
    """Where an adapter's base model is."""

    path: str
    """Its local directory (``config.json`` and weights): what is loaded."""
    name: str
    """What an export of the adapter names as its base: the Hub id when the base was found in the
    Hub cache (portable), else ``path`` (absolute: the export is read from anywhere)."""


def adapter_base(path: str | Path) -> AdapterBase | None:
    """The base model of adapter directory ``path``; None when ``path`` is not an adapter directory."""
    if not is_adapter_dir(path):
        return None
    file = Path(path).expanduser() / ADAPTER_CONFIG
    named = read_adapter_config(path).get("base_model_name_or_path")
    if not named or not isinstance(named, str):
        raise ConfigError(f"{file}: names no base model (base_model_name_or_path)")
    given = Path(named).expanduser()
    places = [given] if given.is_absolute() else [Path.cwd() / given, file.parent / given]
    for place in places:
        if (place / "config.json").is_file():
            local = str(place.resolve())
            return AdapterBase(local, local)
    cached = _hub_snapshot(named)
    if cached is not None:
        return AdapterBase(cached, named)
    where = " nor ".join(str(p) for p in dict.fromkeys(places))
    raise ConfigError(
        f"{file}: base model base_model_name_or_path={named!r} not found: no model directory (config.json) at {where}, "
        "nor a Hugging Face Hub model in the local cache (nothing is downloaded); set it to the base model's local directory"
    )


def _hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot of Hub model ``repo_id`` if it is cached (with its config.json), else None."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError):  # not cached, or not a valid repo id (a path that is not there)
        return None
    return snapshot if (Path(snapshot) / "config.json").is_file() else None


def model_dir(path: str | Path) -> str:
    """The directory holding the model's ``config.json``: ``path``, or an adapter's base."""
    base = adapter_base(path)
    return base.path if base is not None else str(path)


def tokenizer_dir(path: str | Path) -> str:
    """Where the tokenizer of model or adapter directory ``path`` is: ``path``, or for an adapter
    saved without one (PEFT's ``save_pretrained`` writes none; our exports and TRL's carry the
    run's) its base's."""
    if is_adapter_dir(path) and not (Path(path).expanduser() / "tokenizer_config.json").is_file():
        return model_dir(path)
    return str(path)


def load_adapter(model, path: str | Path, *, trainable: bool = False):
    """``model`` (the adapter's base, loaded) with the PEFT adapter at ``path`` as its ``default``
    adapter, frozen unless ``trainable``. The adapter's config names its base as found here
    (``AdapterBase.name``), so that saving it writes a base that loads: the file's own may be
    relative to another directory."""
    from peft import PeftModel

    base = adapter_base(path)
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = base.name
    return peft_model
