"""Typed configuration for every dpo_dist entry point.

One dataclass per config group (``conf/<group>/*.yaml`` fills them in). Hydra composes the
YAML onto these schemas (registered by ``launch``), so an unknown key or a value of the wrong
type fails at composition; cross-field rules live in ``__post_init__`` and raise
``ConfigError`` with one line naming the key. Derived values are methods; nothing mutates a
config at run time.

This module imports neither hydra nor omegaconf: the library takes plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_dist.fingerprint import cache_root

if TYPE_CHECKING:
    from dpo_dist.data.subset import DataSource

_PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = _PACKAGE_DIR / "assets"


class ConfigError(ValueError):
    """A config value that is well-typed but not allowed; its message is one line."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"got {value!r}, expected one of {', '.join(allowed)}")


def _finite_number(value: Any) -> bool:
    """A finite int or float (not a bool, a string or nan): what an untyped value (a dict entry, a
    saved config.yaml read back) must be to be compared as one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


ADAPTER_CONFIG = "adapter_config.json"
"""The file that makes a directory a PEFT adapter (``dpo_dist.adapters``)."""
QUANTIZE_TYPES = ("none", "nf4", "fp4")
"""``model.lora.quantize``: bitsandbytes' 4-bit data types (NormalFloat4 is QLoRA's)."""


@dataclass
class LoraConfig:
    """Low-rank adapters via PEFT; ``r=0`` trains the full weights. With ``model.path`` a PEFT
    LoRA adapter directory, the run trains that adapter further with its own settings (``continued``)."""

    r: int = 0
    """Adapter rank; 0 disables LoRA (full-weight training), except when continuing an adapter."""
    alpha: float = 16.0
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module name suffixes that get adapters (PEFT ``target_modules``)."""
    merge_on_export: bool = True
    """Export a merged full model (True) or only the adapter weights (False)."""
    quantize: str = "none"
    """QLoRA (Dettmers et al. 2023): ``nf4`` or ``fp4`` loads the frozen base weights of every linear
    layer in the decoder blocks 4-bit with bitsandbytes (block-wise, double-quantized constants;
    embeddings, norms and the LM head stay in the run's dtype), and the adapters train on top in the
    run's dtype. The quantized tensors are stored in that dtype, so ZeRO-3 partitions them like any
    other weight. The reference (precomputed or online) is the same quantized base, the policy's
    starting point; ``final/`` merges the adapters into the unquantized ``model.path`` weights.
    Needs ``pip install bitsandbytes`` (CPU and CUDA). ``none``: 16/32-bit base weights."""

    def __post_init__(self) -> None:
        _check(self.r >= 0, "model.lora.r", f"must be >= 0, got {self.r}")
        _check(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.r == 0 or len(self.target_modules) > 0, "model.lora.target_modules", "must not be empty")
        _one_of(self.quantize, "model.lora.quantize", QUANTIZE_TYPES)

    def continued(self, adapter: dict[str, Any], where: str) -> LoraConfig:
        """These settings for a run that continues training the PEFT LoRA adapter whose
        ``adapter_config.json`` is ``adapter`` (``model.path`` an adapter directory; ``where``
        names it): r, alpha, dropout and target modules are the adapter's, since its tensors and
        scaling were trained with them. A value set here other than the field's default that
        differs from the adapter's is refused rather than ignored (r=0, the default, does not mean
        full-weight training here). The target modules become the adapted layers' names without
        their paths (PEFT's ``all-linear`` saves full paths), as the memory planner takes them;
        PEFT loads the adapter from its own file. merge_on_export and quantize stay this run's."""
        _check_continuable(adapter, where)
        values = {
            "r": int(adapter["r"]),
            "alpha": float(adapter.get("lora_alpha", 8)),  # PEFT's defaults for keys an old file lacks
            "dropout": float(adapter.get("lora_dropout", 0.0)),
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}),
        }
        default = LoraConfig()
        for key, value in values.items():
            given = getattr(self, key)
            same = sorted(set(given)) == value if key == "target_modules" else given == value
            if given != getattr(default, key) and not same:
                shown, given = ("[" + ",".join(v) + "]" if key == "target_modules" else f"{v:g}" for v in (value, given))
                raise ConfigError(
                    f"model.lora.{key}={given}: {where} is a LoRA adapter with {key}={shown} (its {ADAPTER_CONFIG}), "
                    f"whose training this run continues with its own settings; leave model.lora.{key} unset"
                )
        return dataclasses.replace(self, **values)

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"

    @property
    def enabled(self) -> bool:
        return self.r > 0


def _check_continuable(adapter: dict[str, Any], where: str) -> None:
    """Refuse, in one line, a PEFT adapter that ``LoraConfig.continued`` cannot train on: another
    method than LoRA, or LoRA with parts that the checkpoints, the merged export or the memory
    plan do not handle (DoRA's magnitudes, trained biases, whole modules beside the adapter)."""
    kind = adapter.get("peft_type")
    _check(kind == "LORA", "model.path", f"{where} is a {kind} adapter: only LoRA adapters can be trained further")
    unsupported = {
        "use_dora": "DoRA (use_dora)",
        "modules_to_save": "whole modules trained beside the adapter (modules_to_save)",
        "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
        "target_parameters": "adapters on parameters (target_parameters)",
        "layer_replication": "replicated layers (layer_replication)",
        "lora_bias": "a bias on lora_B (lora_bias)",
    }
    for key, what in unsupported.items():
        _check(not adapter.get(key), "model.path", f"{where}: its LoRA adapter has {what}, which dpo_dist does not train")
    bias = adapter.get("bias", "none")
    _check(bias == "none", "model.path", f"{where}: its LoRA adapter trains biases (bias={bias}), which dpo_dist does not")
    targets = adapter.get("target_modules")
    _check(
        isinstance(targets, list) and bool(targets) and all(isinstance(t, str) for t in targets),
        "model.path",
        f"{where}: its adapter's target_modules is {targets!r}; continuing an adapter needs the list of module names PEFT saves",
    )
    _check(isinstance(adapter.get("r"), int) and adapter["r"] > 0, "model.path", f"{where}: its adapter's r is {adapter.get('r')!r}")


@dataclass
class ModelConfig:
    """The policy (and, unless precomputed, reference) model."""

    name: str = "tiny"
    """Preset name, for logs and run_info (tiny, llama3_1b, llama3_8b, llama3_70b, custom)."""
    path: str | None = str(ASSETS_DIR / "tiny_model")
    """Local Hugging Face model directory (config + safetensors). Nothing is downloaded; presets
    for real models set it to null so that forgetting ``model.path=...`` is an error. A PEFT LoRA
    adapter directory (``adapter_config.json``: a ``merge_on_export=false`` export, TRL's SFT
    adapter) continues training that adapter on the base it names (``dpo_dist.adapters``); the
    reference is then the starting policy, base plus adapter as loaded."""
    tokenizer_path: str | None = None
    """Tokenizer directory; defaults to ``path``."""
    attn_backend: str = "auto"
    """Packed attention kernel: auto | flash | varlen | sdpa. A forced one that is unavailable is an error."""
    dtype: str = "auto"
    """Training precision: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (saves activation memory, costs ~1/3 more compute)."""
    disable_dropout: bool = True
    """Zero the base model's dropout before training (TRL's disable_dropout, on by default): its
    nn.Dropout modules and the attention dropout its attention layers keep. The policy's step-0
    log-probs then equal the reference's (always scored without dropout), and the flash/varlen
    kernels, which have no dropout, can run. LoRA's own dropout is model.lora.dropout."""
    logits_chunk_tokens: int = 1024
    """Tokens per chunk when computing log-probs; bounds fp32 logits memory to chunk x vocab."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings (``model.lora.*``)."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", f"required for model={self.name} (a local Hugging Face directory)")
        from dpo_dist.adapters import is_adapter_dir, read_adapter_config  # it imports this module

        if is_adapter_dir(self.path):
            # A PEFT adapter directory is the adapter to train further: the LoRA settings are its
            # own, resolved here once, so that everything reading model.lora (the engine, the memory
            # plan, the run's config.yaml, a resume's comparison) sees the run as it trains.
            self.lora = self.lora.continued(read_adapter_config(self.path), f"model.path={self.path}")
        _check(
            not self.lora.quantized or self.lora.enabled,
            "model.lora.quantize",
            f"{self.lora.quantize} (QLoRA) trains adapters on a frozen quantized base: set model.lora.r (e.g. 16)",
        )
        _one_of(self.attn_backend, "model.attn_backend", ("auto", "flash", "varlen", "sdpa"))
        _one_of(self.dtype, "model.dtype", ("auto", "fp32", "bf16"))
        _check(self.logits_chunk_tokens > 0, "model.logits_chunk_tokens", "must be > 0")

    def resolved_tokenizer_path(self) -> str:
        """``tokenizer_path``, else ``path``'s tokenizer (an adapter's base's when it has none)."""
        from dpo_dist.adapters import tokenizer_dir

        return self.tokenizer_path or tokenizer_dir(self.path)


@dataclass
class DataConfig:
    """Preference data: where it is and how it becomes token ids."""

    train_path: str | None = str(ASSETS_DIR / "data" / "train.jsonl")
    """Training pairs: JSONL, JSON (either may be gzipped), Parquet, a saved ``datasets`` directory,
    or a glob pattern of such files read in sorted order as one (required)."""
    eval_path: str | None = str(ASSETS_DIR / "data" / "eval.jsonl")
    """Held-out pairs for reward accuracy and win-rate; null disables eval (unless ``eval_split``)."""
    max_samples: int = 0
    """Use only the first N records of ``train_path`` (0: all; OpenRLHF's ``--max_samples``, TRL's
    ``dataset.select(range(N))``). N counts the file's records as stored, invalid ones included,
    before anything is dropped, so fewer pairs remain when some are invalid or dropped by
    ``truncation`` (the start-of-run log gives both counts); reading stops at record N. With
    ``eval_split`` the split divides these N. Not applied to ``eval_path``. Part of the
    tokenization and reference cache keys (see dpo_dist.data.subset)."""
    eval_split: float | int = 0
    """Hold records of ``train_path`` out of training for evaluation, for data without an eval file
    (``eval_path`` must be null), as ``train_test_split(test_size=...)``: a float in (0, 1) is a
    fraction of its valid records (rounded up), an int >= 1 a number of them; 0: none. Whole
    prompts are held out, picked by a hash of the normalised prompt: the same records on every
    rank, resume and re-run, and no held-out prompt is trained on. The held-out records serve all
    that ``eval_path`` does (eval/* rows, the eval reference cache, dpo-eval, win-rate prompts)."""
    max_length: int = 256
    """Longest prompt + response, in tokens; longer pairs follow ``truncation``."""
    truncation: str = "keep_end_of_prompt"
    """keep_end_of_prompt (cut the prompt's start, then the responses' ends) | keep_start (cut the
    responses' ends; a pair whose prompt fills max_length is dropped, as TRL) | drop (see
    dpo_dist.data.tokenize)."""
    on_invalid: str = "error"
    """error: stop before any model work on a bad record | skip: drop bad records and log the count."""
    chat_template: str | None = None
    """A Jinja chat template, or the path of a file holding one, used instead of the tokenizer's
    own (OpenRLHF's ``--tokenizer_chat_template``): chat data on a base model whose tokenizer has
    none, or another format. Part of the tokenizer's fingerprint; saved with the exported model."""
    prompt_key: str = "prompt"
    """The record key that holds the prompt (OpenRLHF's ``--prompt_key``)."""
    chosen_key: str = "chosen"
    """The record key that holds the chosen response."""
    rejected_key: str = "rejected"
    """The record key that holds the rejected response."""
    cache_dir: str | None = None
    """Tokenization cache; defaults to ``~/.cache/dpo_dist/tokenized``."""

    def __post_init__(self) -> None:
        _check(bool(self.train_path), "data.train_path", "required (a JSONL, JSON, Parquet file or datasets directory)")
        _check(self.max_length >= 3, "data.max_length", f"must be >= 3 (BOS, a prompt and a response token), got {self.max_length}")
        _one_of(self.truncation, "data.truncation", ("keep_end_of_prompt", "keep_start", "drop"))
        _one_of(self.on_invalid, "data.on_invalid", ("error", "skip"))
        keys = self.columns()
        _check(all(k.strip() for k in keys) and len(set(keys)) == 3, "data.prompt_key", f"the three data.*_key must be distinct names, got {list(keys)}")
        _check(
            isinstance(self.max_samples, int) and not isinstance(self.max_samples, bool) and self.max_samples >= 0,
            "data.max_samples", f"must be a whole number >= 0 (0: all records), got {self.max_samples!r}",
        )  # fmt: skip
        split = self.eval_split
        _check(
            _finite_number(split) and (0 < split < 1 if isinstance(split, float) and split else split >= 0),
            "data.eval_split",
            f"must be a fraction in (0, 1) or a whole number of records >= 1 (0: none), got {split!r}",
        )
        _check(
            not (split and self.eval_path),
            "data.eval_split",
            f"holds out records of data.train_path for evaluation, instead of an eval file: set data.eval_path=null (it is {self.eval_path})",
        )

    def sources(self) -> tuple[DataSource, DataSource | None]:
        """The run's training data and its held-out data (None without ``eval_path`` or
        ``eval_split``): what every reader of ``train_path``/``eval_path`` goes through."""
        from dpo_dist.data.subset import DataSource, Selection

        if not self.eval_split:
            train = DataSource(self.train_path, Selection(self.max_samples))
            return train, DataSource(self.eval_path) if self.eval_path else None
        sides = (Selection(self.max_samples, self.eval_split, side) for side in ("train", "eval"))
        return tuple(DataSource(self.train_path, selection) for selection in sides)

    def columns(self) -> tuple[str, str, str]:
        """The record keys of the prompt, chosen and rejected fields (``data.records``' ``columns``)."""
        return (self.prompt_key, self.chosen_key, self.rejected_key)

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "tokenized"


LOSS_NAMES = (
    "sigmoid", "robust", "hinge", "ipo", "kto_pair", "simpo", "rpo",
    "exo_pair", "nca_pair", "bco_pair", "aot", "aot_unpaired", "sppo_hard", "apo_zero", "apo_down", "discopop",
    "orpo", "cpo",
)
SMOOTHED_LOSSES = ("sigmoid", "robust", "simpo", "rpo", "exo_pair", "cpo", "aot", "aot_unpaired")
BATCH_STATISTICS_LOSSES = ("kto_pair", "aot", "aot_unpaired")
REFERENCE_FREE_LOSSES = ("simpo", "orpo", "cpo")
MEAN_LOGP_LOSSES = ("simpo", "orpo")
"""As dpo_dist.losses' sets of the same names (a test keeps them in step; config imports no torch)."""
F_DIVERGENCE_LOSSES = ("sigmoid", "rpo", "robust", "hinge", "ipo", "exo_pair", "discopop")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
OPTION_LOSSES = {
    "label_smoothing": SMOOTHED_LOSSES,
    "gamma": ("simpo",),
    "discopop_tau": ("discopop",),
    "f_divergence_type": F_DIVERGENCE_LOSSES,
    "f_alpha_divergence_coef": F_DIVERGENCE_LOSSES,
}
"""The losses that read each loss-specific ``loss.*`` option (a test keeps this in step with
dpo_dist.losses): setting one for another loss would change nothing, so it is refused."""


@dataclass
class LossConfig:
    """Preference objective (``loss=<name>`` picks a preset from conf/loss/)."""

    name: str = "sigmoid"
    """sigmoid (DPO) | robust | hinge | ipo | kto_pair | simpo | rpo (sigmoid + alpha * NLL of chosen) |
    exo_pair | nca_pair | bco_pair | aot | aot_unpaired | sppo_hard | apo_zero | apo_down | discopop |
    orpo | cpo (papers: dpo_dist/losses.py). simpo, orpo and cpo are reference-free; kto_pair, aot and
    aot_unpaired need statistics of the whole step, one more no-grad forward per micro-batch. (TRL's
    loss_type "sft" is ``stage=sft``.)"""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (KL strength); for orpo the weight of the odds-ratio
    term (the paper's lambda); for simpo and cpo the scale of the policy-only margin."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate epsilon (cDPO for sigmoid, rpo, simpo, cpo, aot and aot_unpaired, rDPO
    for robust; EXO's target (1 - eps, eps)); the other losses refuse a non-zero value."""
    logp_normalization: str = "sum"
    """sum: summed response log-probs (DPO) | mean: per-token average (IPO by its preset; required by
    simpo and orpo)."""
    gamma: float = 0.5
    """SimPO target reward margin (simpo only)."""
    alpha: float = 0.0
    """Weight of the NLL-of-chosen term added to the loss (RPO / DPO+SFT, and ORPO's and CPO's own
    NLL term: 1.0 in their presets); 0 disables it."""
    discopop_tau: float = 0.05
    """DiscoPOP temperature: how sharply its logistic/exponential mix switches with the margin
    (discopop only)."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO (Wang et al. 2023): the divergence from the reference that the margin losses regularise,
    reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence; for sigmoid, rpo, robust, hinge,
    ipo, exo_pair and discopop on summed log-probs (TRL's f_divergence_type)."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of f_divergence_type=alpha_divergence, in (0, 1): f'(u) = (1 - u^-alpha) / alpha, near
    reverse_kl for small alpha and forward_kl near 1 (TRL's code takes 1 - alpha: see losses.py)."""
    use_weighting: bool = False
    """WPO (Zhou et al. 2024, TRL's use_weighting): weight each pair's preference loss by the
    policy's detached, sampling-aligned probability of its two responses (per-token geometric
    means), so that pairs the policy would not generate count less. Not with aot/aot_unpaired."""
    ld_alpha: float | None = None
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411; TRL's ld_alpha), in [0, 1]: with l the shorter
    response's token count of a pair, each response's log-prob, policy's and reference's alike, is
    the sum over its first l tokens plus ld_alpha times the sum over the rest (its "verbose" tail),
    so that the loss is less driven by length. 1 is plain DPO, 0 ignores the tail; null (default):
    off. Everything the loss and the rewards see takes these log-probs (with
    logp_normalization=mean divided by the full response length, as TRL's ipo); the loss.alpha NLL,
    WPO's weights and the logged logps stay on whole responses. Needs a loss with a reference (not
    simpo, orpo, cpo). The reference cache then also stores each response's tail sum (not ld_alpha:
    a sweep over it shares one cache)."""
    weights: dict[str, float] = field(default_factory=dict)
    """A weighted sum of preference losses, {name: weight >= 0} (TRL's loss_type list with
    loss_weights; a 0 drops the term), e.g. MPO's {sigmoid: 0.8, bco_pair: 0.2} with alpha: 1.0 as
    its SFT term (``loss=mpo``). loss.name must be one of the names, weighted > 0 (the logged rewards
    are its); the terms share beta and the other loss.* settings, so at most one of them may read
    label_smoothing, and an f-divergence needs every term to take it. Empty (default): loss.name alone."""

    def __post_init__(self) -> None:
        _check(self.name != "sft", "loss.name", "supervised fine-tuning is stage=sft (TRL's loss_type sft), not a preference loss")
        _one_of(self.name, "loss.name", LOSS_NAMES)
        _check(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        _check(0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
        _one_of(self.logp_normalization, "loss.logp_normalization", ("sum", "mean"))
        _check(self.alpha >= 0, "loss.alpha", "must be >= 0")
        _check(self.discopop_tau > 0, "loss.discopop_tau", "must be > 0")
        _one_of(self.f_divergence_type, "loss.f_divergence_type", F_DIVERGENCES)
        _check(0 < self.f_alpha_divergence_coef < 1, "loss.f_alpha_divergence_coef", f"must be in (0, 1), got {self.f_alpha_divergence_coef}")
        _check(
            self.f_alpha_divergence_coef == 0.5 or self.f_divergence_type == "alpha_divergence",
            "loss.f_alpha_divergence_coef",
            "is alpha_divergence's alpha: set loss.f_divergence_type=alpha_divergence too",
        )
        self._check_weights()
        terms = self.terms()
        described = self.name if not self.weights else f"{self.name} (loss.weights: {', '.join(terms)})"
        for option, users in OPTION_LOSSES.items():
            default = next(f.default for f in dataclasses.fields(self) if f.name == option)
            _check(
                getattr(self, option) == default or self.name in users or any(t in users for t in terms),
                f"loss.{option}",
                f"loss={described} does not use it (only {', '.join(users)}): leave it at {default}",
            )
        _check(
            "exo_pair" not in terms or self.label_smoothing > 0,
            "loss.label_smoothing",
            "exo_pair needs eps > 0 (its target distribution is (1 - eps, eps)); conf/loss/exo_pair.yaml uses 0.001",
        )
        smoothed = [t for t in terms if t in SMOOTHED_LOSSES]
        _check(
            self.label_smoothing == 0 or len(smoothed) <= 1,
            "loss.label_smoothing",
            f"the terms {', '.join(smoothed)} would all read this one eps (sigmoid's becoming cDPO): "
            "weight at most one loss that takes label_smoothing",
        )
        if self.f_divergence_type != "reverse_kl":
            others = [t for t in terms if t not in F_DIVERGENCE_LOSSES]
            _check(
                not others,
                "loss.f_divergence_type",
                f"{', '.join(others)} has no f-divergence form (only {', '.join(F_DIVERGENCE_LOSSES)}); TRL refuses this mix too",
            )
            _check(
                self.logp_normalization == "sum",
                "loss.f_divergence_type",
                "f-DPO scores sequence probability ratios: it needs loss.logp_normalization=sum",
            )
        _check(
            not self.use_weighting or not any(t in ("aot", "aot_unpaired") for t in terms),
            "loss.use_weighting",
            "aot and aot_unpaired pair each policy margin with another pair's by rank: per-pair weights have no meaning there",
        )
        self._check_ld_alpha(terms)
        mean_only = [t for t in terms if t in MEAN_LOGP_LOSSES]
        _check(
            not mean_only or self.logp_normalization == "mean",
            "loss.logp_normalization",
            f"{mean_only[0] if mean_only else ''} is defined on length-normalised log-probs: set loss.logp_normalization=mean",
        )

    def _check_ld_alpha(self, terms: dict[str, float]) -> None:
        if self.ld_alpha is None:
            return
        _check(
            _finite_number(self.ld_alpha) and 0 <= self.ld_alpha <= 1,
            "loss.ld_alpha",
            f"must be in [0, 1] (1: plain DPO) or null (off), got {self.ld_alpha!r}",
        )
        reference_free = [t for t in terms if t in REFERENCE_FREE_LOSSES]
        # LD-DPO reweights the tokens of DPO's implicit reward log(pi / pi_ref); the reference-free
        # losses have none and handle length their own way (TRL's CPO and ORPO trainers have no ld_alpha).
        _check(
            not reference_free,
            "loss.ld_alpha",
            f"{', '.join(reference_free)} has no reference log-ratio to desensitise (LD-DPO is for losses with a reference)",
        )

    def _check_weights(self) -> None:
        _check(isinstance(self.weights, dict), "loss.weights", f"must be a mapping {{loss name: weight}}, got {self.weights!r}")
        hints = {
            "rpo": "rpo is sigmoid plus loss.alpha times the NLL: weight sigmoid and set loss.alpha",
            "sft": "TRL's sft term is loss.alpha (the chosen responses' NLL added to the loss)",
        }
        for term, weight in self.weights.items():
            _check(term not in hints, "loss.weights", hints.get(term, ""))
            _one_of(term, "loss.weights", tuple(n for n in LOSS_NAMES if n != "rpo"))
            _check(_finite_number(weight) and weight >= 0, f"loss.weights.{term}", f"must be a finite number >= 0, got {weight!r}")
        _check(
            not self.weights or self.weights.get(self.name, 0) > 0,
            "loss.weights",
            f"must give loss.name ({self.name}), whose rewards are logged, a weight > 0: "
            f"e.g. loss.name={next((t for t, w in self.weights.items() if w > 0), self.name)}",
        )

    def kernel_name(self) -> str:
        """The ``dpo_dist.losses`` function behind this preset (rpo is sigmoid plus the NLL term)."""
        return "sigmoid" if self.name == "rpo" else self.name

    def terms(self) -> dict[str, float]:
        """{``dpo_dist.losses`` name: weight} of the loss: loss.weights without its zero weights (a
        sweep may switch a term off), or loss.name's function alone."""
        if not self.weights:
            return {self.kernel_name(): 1.0}
        return {name: float(weight) for name, weight in self.weights.items() if weight > 0}

    def uses_reference(self) -> bool:
        return any(term not in REFERENCE_FREE_LOSSES for term in self.terms())

    def uses_batch_statistics(self) -> bool:
        """Whether the loss needs statistics of the whole step (``losses.BATCH_STATISTICS``: kto_pair's
        KL baselines, aot's rank partners), which the engine gets from one extra no-grad forward per
        micro-batch."""
        return any(term in BATCH_STATISTICS_LOSSES for term in self.terms())


@dataclass
class OptimConfig:
    """AdamW with warmup and decay."""

    lr: float = 1e-6
    """Peak learning rate (TRL's DPO default; conf/model/tiny.yaml sets 2e-4 for the tiny model)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, of weight matrices only (not of biases and norm weights, as HF's
    Trainer, nanoGPT and torchtitan)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 10
    """Linear warmup over this many optimizer steps: step k (0-based) of it runs at (k+1)/(warmup_steps+1) * lr;
    step warmup_steps runs at lr."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of the run's steps (HF's ``warmup_ratio``, OpenRLHF's
    ``--lr_warmup_ratio``): ``ceil(warmup_ratio * steps)``; when set it replaces ``warmup_steps``
    (useful with ``train.epochs``, whose step count depends on the data)."""
    schedule: str = "cosine"
    """Decay after warmup: cosine | linear | constant."""
    min_lr_ratio: float = 0.1
    """lr of the last step (train.max_steps - 1) as a fraction of lr (cosine and linear)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""

    def warmup_for(self, steps: int) -> int:
        """Warmup steps of a run of ``steps`` optimizer steps (``warmup_ratio`` or ``warmup_steps``)."""
        return self.warmup_steps if self.warmup_ratio is None else math.ceil(round(self.warmup_ratio * steps, 9))

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(
            self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1) (or null), got {self.warmup_ratio}"
        )
        _one_of(self.schedule, "optim.schedule", ("cosine", "linear", "constant"))
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(len(self.betas) == 2, "optim.betas", "needs two values")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings; ``to_dict`` renders the JSON DeepSpeed reads."""

    stage: int = 3
    """ZeRO stage: 3 partitions weights, gradients and Adam states over the ranks. A single rank
    has nothing to partition; there 0 trains the same, faster (benchmarks/README.md), but
    DeepSpeed's stage 0 can sum bf16 gradients only in bf16 (see ``grad_accum_dtype``)."""
    grad_accum_dtype: str = "fp32"
    """fp32 | bf16: what a bf16 run sums its gradients in over the micro-batches of a step (DeepSpeed
    ``data_types.grad_accum_dtype``; fp32 runs always use fp32). bf16 keeps 8 significant bits, so
    as the sum grows the later micro-batches' contributions are rounded off; fp32 costs 2 more bytes
    per trainable parameter, divided over the ranks. Stage 0 supports only bf16."""
    offload_optimizer: str = "none"
    """none | cpu: fp32 master weights and Adam states in pinned host memory, where the optimizer
    step runs (DeepSpeed's CPU Adam)."""
    offload_param: str = "none"
    """cpu: keep the (bf16) parameter partitions in host memory between uses (ZeRO-3 only; the fp32
    master weights and Adam states move with offload_optimizer)."""
    overlap_comm: bool = True
    """Overlap reduce-scatter with backward compute."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (stage3_prefetch_bucket_size)."""
    param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay gathered (stage3_param_persistence_threshold)."""
    max_live_parameters: int = 1_000_000_000
    """Upper bound on gathered parameters at once (stage3_max_live_parameters)."""
    leaf_modules: str = "auto"
    """ZeRO-3 fetch units. auto: every transformer block (the model's ``_no_split_modules`` classes,
    e.g. LlamaDecoderLayer) is gathered whole, one hook and one all-gather per block instead of one
    per linear and norm, whose host overhead dominates small steps (benchmarks/README.md); none:
    DeepSpeed's per-module hooks; or comma-separated module class names. LoRA runs keep per-module
    hooks (DeepSpeed cannot gather a block holding PEFT adapters whole)."""
    comm_timeout_minutes: int = 30
    """Collective timeout: a dead rank fails the job instead of hanging it. Rank-0-only work
    (tokenizing the data, consolidating a checkpoint for dpo-eval) is waited out apart from it
    (``distributed.LONG_WAIT``)."""

    def __post_init__(self) -> None:
        _check(self.stage in (0, 1, 2, 3), "deepspeed.stage", f"must be 0..3, got {self.stage}")
        _one_of(self.grad_accum_dtype, "deepspeed.grad_accum_dtype", ("fp32", "bf16"))
        _one_of(self.offload_optimizer, "deepspeed.offload_optimizer", ("none", "cpu"))
        _one_of(self.offload_param, "deepspeed.offload_param", ("none", "cpu"))
        _check(self.offload_param == "none" or self.stage == 3, "deepspeed.offload_param", "needs deepspeed.stage=3")
        _check(self.comm_timeout_minutes > 0, "deepspeed.comm_timeout_minutes", "must be > 0")

    def to_dict(self, *, bf16: bool, grad_clip: float, frozen: bool = False) -> dict[str, Any]:
        """DeepSpeed config. Batch sizes are 1/1 because the engine forms its own packed
        micro-batches and marks accumulation boundaries itself. A ``frozen`` model (reference,
        generation) runs stages 1 and 2 as 0: they partition only gradients and optimizer states,
        which it has none of (and DeepSpeed refuses them without an optimizer)."""
        stage = 0 if frozen and self.stage in (1, 2) else self.stage
        if bf16 and stage == 0 and self.grad_accum_dtype == "fp32" and not frozen:
            raise ConfigError(
                "deepspeed.grad_accum_dtype: DeepSpeed's stage 0 sums bf16 gradients in bf16 only; "
                "set deepspeed.grad_accum_dtype=bf16 or use deepspeed.stage=1 (fp32 sums; it partitions only the optimizer states)"
            )
        zero: dict[str, Any] = {
            "stage": stage,
            "overlap_comm": self.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": self.reduce_bucket_size,
        }
        if stage == 3:
            zero.update(
                stage3_prefetch_bucket_size=self.prefetch_bucket_size,
                stage3_param_persistence_threshold=self.param_persistence_threshold,
                stage3_max_live_parameters=self.max_live_parameters,
                stage3_gather_16bit_weights_on_model_save=True,
            )
        for kind, where in (("optimizer", self.offload_optimizer), ("param", self.offload_param)):
            if where != "none":
                zero[f"offload_{kind}"] = {"device": where, "pin_memory": True}
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip,
            "bf16": {"enabled": bf16},
            **({"data_types": {"grad_accum_dtype": self.grad_accum_dtype}} if bf16 and not frozen else {}),
            "zero_optimization": zero,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            # On by default, its start() synchronizes the device at every engine forward (every
            # micro-batch) to time what steps_per_print never reports: the engine measures tokens/s.
            "timers": {"throughput": {"enabled": False}},
        }


USABLE_GPU_FRACTION = 0.989
"""What CUDA reports (``total_memory``) of a GPU's memory as sold: 79.1-79.2 GiB of an "80GB" H100 or
A100, 39.6 of an A100 40GB, 139.8 of an H200 141GB (ECC and the driver keep the rest)."""


@dataclass
class ClusterConfig:
    """Where the ranks run: ``local`` (this machine) or ``slurm`` (submitit)."""

    name: str = "local"
    """local | slurm."""
    nproc_per_node: int = 1
    """Ranks on this machine for cluster=local."""
    nodes: int = 1
    """Slurm nodes."""
    tasks_per_node: int = 1
    """Slurm tasks (ranks) per node; usually gpus_per_node."""
    gpus_per_node: int = 0
    """GPUs requested per node (0 on CPU clusters)."""
    gpu_memory_gb: float | None = 80.0
    """Memory of one GPU as the card is sold, in GB: 80 for an H100 or A100 80GB, 141 for an H200,
    40 for an A100 40GB. The memory planner (``dpo-plan`` and the check ``dpo-train`` runs before
    launching on GPUs) budgets what CUDA reports usable of it, ``USABLE_GPU_FRACTION`` (79.1 GiB of
    80). null: the first local GPU's reported capacity (cluster=local on a machine with CUDA). The
    plan's fragmentation margin and its allowance for the CUDA context and NCCL are part of the
    peak compared with the budget, not slack in it."""
    cpus_per_task: int = 1
    """CPU cores per rank."""
    mem_gb: float = 0.0
    """Host memory per node in GiB (Slurm ``--mem``); 0 leaves it to the partition default."""
    partition: str | None = None
    """Slurm partition."""
    account: str | None = None
    """Slurm account."""
    qos: str | None = None
    """Slurm QOS."""
    constraint: str | None = None
    """Slurm node constraint."""
    time: int = 60
    """Slurm time limit in minutes."""
    max_requeues: int = 3
    """How many times a preempted or timed-out job requeues itself."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which Slurm warns the job (USR2): the preemption checkpoint
    must be written within them (``cluster=slurm`` submissions use at most a quarter of ``time``;
    the plain-sbatch path ``slurm/dpo_train.sbatch`` uses it as given, its time limit being the
    script's). A preemption by another job gives the cluster's GraceTime instead, which its
    admins set."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch parameters passed through to submitit."""
    master_port: int | None = None
    """Rendezvous port of rank 0. ``cluster=local``: exactly this port on 127.0.0.1 (refused if it
    is taken); null, the default, picks a free one, so local runs side by side never collide.
    Slurm: the base of ``MASTER_PORT = master_port + (16 * SLURM_JOB_ID + SLURM_STEP_ID) % 1000``
    (null: 29500). An exported ``MASTER_PORT`` wins on Slurm."""

    def __post_init__(self) -> None:
        _one_of(self.name, "cluster.name", ("local", "slurm"))
        for key in ("nproc_per_node", "nodes", "tasks_per_node", "cpus_per_task"):
            _check(getattr(self, key) >= 1, f"cluster.{key}", "must be >= 1")
        _check(self.gpus_per_node >= 0, "cluster.gpus_per_node", "must be >= 0")
        _check(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "cluster.gpu_memory_gb", "must be > 0")
        _check(
            self.gpu_memory_gb is not None or self.name == "local",
            "cluster.gpu_memory_gb",
            "null (the local GPU's capacity) needs cluster=local: set the Slurm GPUs' memory in GB",
        )
        _check(self.time >= 1, "cluster.time", "must be >= 1 minute")
        _check(self.signal_delay_s >= 0, "cluster.signal_delay_s", "must be >= 0")
        _check(self.max_requeues >= 0, "cluster.max_requeues", f"must be >= 0, got {self.max_requeues}")
        # Slurm adds up to 999 to the base port (see the docstring): the sum must still be a port.
        top = 65535 if self.name == "local" else 65535 - 999
        _check(
            self.master_port is None or 1 <= self.master_port <= top,
            "cluster.master_port",
            f"must be between 1 and {top} for cluster={self.name} (or null), got {self.master_port}",
        )
        # One rank per GPU: more tasks than GPUs would share GPUs (and the memory plan assumes not).
        _check(
            self.name != "slurm" or self.gpus_per_node == 0 or self.tasks_per_node == self.gpus_per_node,
            "cluster.tasks_per_node",
            f"must equal cluster.gpus_per_node ({self.gpus_per_node}): one rank per GPU, got {self.tasks_per_node}",
        )

    def world_size(self) -> int:
        if self.name == "local":
            return self.nproc_per_node
        return self.nodes * self.tasks_per_node

    def gpu_memory_gib(self) -> float:
        """The planner's per-GPU budget in GiB: the usable part of ``gpu_memory_gb``, or for null the
        local GPU's own capacity (see there)."""
        if self.gpu_memory_gb is not None:
            return round(self.gpu_memory_gb * USABLE_GPU_FRACTION, 1)
        import torch

        if self.name != "local" or not torch.cuda.is_available():
            raise ConfigError(
                "cluster.gpu_memory_gb: null means the local GPU's capacity, but there is no local CUDA GPU "
                "to ask: set the GPUs' memory in GB (80 for an H100 80GB)"
            )
        return torch.cuda.get_device_properties(0).total_memory / 2**30


BEST_METRICS = {
    "eval/loss": False,
    "eval/nll_loss": False,
    "eval/pref_loss": False,
    "eval/reward_accuracy": True,
    "eval/reward_margin": True,
}
"""``train.metric_for_best_model``'s choices (eval metrics of ``metrics.jsonl``) and whether a
greater value is better, inferred as HF's Trainer infers ``greater_is_better``: a loss is better
lower. Other eval metrics (chosen/rejected rewards and log-probs) have no better direction."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 120
    """Optimizer steps (unless ``epochs`` is set)."""
    epochs: float | None = None
    """Passes over the training pairs, when set instead of a step count (TRL's
    ``num_train_epochs``, OpenRLHF's ``--max_epochs``): ``ceil(epochs * pairs / pairs_per_step)``
    steps (``steps_for``), counted over the pairs that remain after invalid and dropped records;
    it replaces ``max_steps``. A run's pairs are one seeded permutation per epoch, streamed, so
    the step that crosses an epoch boundary ends one pass and begins the next."""
    pairs_per_step: int = 32
    """Preference pairs per optimizer step, over all ranks and micro-batches (the global batch)."""
    micro_batch_tokens: int = 2048
    """Token budget of one packed micro-batch (chosen + rejected of every pair in it)."""
    checkpoint_every: int = 40
    """Save a resumable checkpoint every N steps and after the last one, so that a finished run can
    train longer (0: never; ``final/`` is exported at the end either way)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (older ones are deleted; the best one of
    ``metric_for_best_model`` is kept in addition)."""
    export_checkpoints: bool = False
    """Also write every checkpoint as a Hugging Face model + tokenizer, ``checkpoints/step_N/hf/``
    (``from_pretrained`` loads it, as every checkpoint of HF's Trainer), with the export that
    writes ``final/`` (``checkpoint.export_hf``: under ZeRO-3 the ranks gather one parameter at a
    time and rank 0 writes one 5 GB shard at a time; LoRA merged, or the adapter alone with
    ``model.lora.merge_on_export=false``); deleted with its checkpoint. Costly at scale: each save
    then also writes a 16-bit copy of the model (141 GB for 70B) and every rank waits minutes
    for the gathers, beside the DeepSpeed state (~0.85 TB for 70B). ``hf/`` is swapped in whole,
    after the checkpoint is complete: a preemption checkpoint (seconds of grace) and an export
    cut short leave it to the job that resumes from that checkpoint, which writes it first.
    False: ``dpo-export`` converts any checkpoint on demand (one process, one shard of memory)."""
    metric_for_best_model: str | None = None
    """HF's ``metric_for_best_model`` with ``load_best_model_at_end``: the eval metric that picks
    the best checkpoint (``BEST_METRICS``: ``eval/loss``, ``eval/nll_loss``, ``eval/pref_loss``
    lower is better; ``eval/reward_accuracy``, ``eval/reward_margin`` higher; the first of equal
    values wins). That checkpoint is never pruned (kept beside the newest ``keep_checkpoints``),
    its step and value go to ``output_dir/best.json`` and the log, and at the end it is written
    as a Hugging Face model to ``output_dir/best/`` (``final/`` stays the last step): linked from
    its ``hf/`` (``export_checkpoints``) or ``final/`` when it is the last step, else converted
    as ``dpo-export`` does, by rank 0 alone (for 70B: reading the checkpoint's ~0.85 TB, tens of
    minutes while the other ranks wait; ``export_checkpoints`` spares it). Every checkpoint must
    be an eval step: ``checkpoint_every`` a multiple of ``eval_every`` (HF's rule for save_steps
    and eval_steps). It survives a resume: the best is read back from ``metrics.jsonl`` and the
    checkpoints on disk. null: no best model."""
    eval_every: int = 40
    """Evaluate on the held-out data (data.eval_path or data.eval_split) every N steps (0: only at the end)."""
    log_every: int = 1
    """Write a train metrics row every N steps (eval steps and the last step are always written)."""
    seed: int = 0
    """Seeds data order, initialisation of new weights and dropout."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.epochs is None or self.epochs > 0, "train.epochs", f"must be > 0 (or null: train.max_steps), got {self.epochs}")
        _check(self.pairs_per_step >= 1, "train.pairs_per_step", "must be >= 1")
        _check(self.micro_batch_tokens >= 2, "train.micro_batch_tokens", "must be >= 2")
        for key in ("checkpoint_every", "eval_every"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(
            not self.export_checkpoints or self.checkpoint_every > 0,
            "train.export_checkpoints",
            "needs checkpoints to export: train.checkpoint_every > 0 (final/ is exported either way)",
        )
        if self.metric_for_best_model is not None:
            self._check_best_model()

    def _check_best_model(self) -> None:
        key, every = "train.metric_for_best_model", (self.checkpoint_every, self.eval_every)
        _one_of(self.metric_for_best_model, key, tuple(BEST_METRICS))
        _check(min(every) > 0, key, "needs checkpoints and evals: train.checkpoint_every and train.eval_every > 0")
        # A checkpoint without an eval could never be the best, and an eval without one has no
        # weights to keep: HF's Trainer refuses such a save_steps alike.
        _check(
            self.checkpoint_every % self.eval_every == 0,
            key,
            f"every checkpoint must be an eval step: train.checkpoint_every ({every[0]}) must be a multiple of train.eval_every ({every[1]})",
        )

    def greater_is_better(self) -> bool:
        """Whether a greater ``metric_for_best_model`` is better (``BEST_METRICS``)."""
        return BEST_METRICS[self.metric_for_best_model]

    def steps_for(self, pairs: int) -> int:
        """Optimizer steps of a run over ``pairs`` training pairs: ``max_steps``, or with ``epochs``
        set the steps that take ``epochs`` passes over them (at least 1)."""
        if self.epochs is None:
            return self.max_steps
        return max(1, math.ceil(round(self.epochs * pairs / self.pairs_per_step, 9)))

    def resolved(self, pairs: int) -> TrainConfig:
        """This config with ``max_steps`` = ``steps_for(pairs)``: what a run over ``pairs`` trains."""
        return dataclasses.replace(self, max_steps=self.steps_for(pairs))


@dataclass
class ReferenceConfig:
    """Where reference log-probs come from."""

    mode: str = "precompute"
    """precompute: one forward pass into Arrow shards, reused by every run | online: a reference forward each step."""
    cache_dir: str | None = None
    """Shard directory; defaults to ``~/.cache/dpo_dist/reference/<fingerprint>`` so sweeps share it."""
    partition: str = "auto"
    """How the frozen reference model is held, by the precompute pass and by ``mode=online`` without
    LoRA: ``replicate`` (a full copy per rank, plain forwards, no collectives), ``zero3``
    (partitioned as in training, every layer gathered per forward: for models no single device
    holds), ``auto``: replicate when the weights take at most half of one device's memory (the GPU's
    capacity; on CPU the host's available memory shared by the node's ranks) and, for the online
    copy on GPUs, training still fits beside it (the memory plan); else zero3. The numbers are the
    same either way."""
    model_path: str | None = None
    """The reference model's directory when it is not the policy's starting point ``model.path``
    (TRL's ``ref_model``, OpenRLHF's ``--ref_pretrain``): e.g. DPO continued from an earlier round's
    model against the SFT model. It scores the policy's tokens, so it needs the policy's vocabulary;
    loaded as the policy's base is (``model.dtype``, QLoRA's ``model.lora.quantize``). Not with
    LoRA and ``mode=online``, whose reference is the policy with its adapters off (as TRL refuses
    a ``ref_model`` beside a PEFT config); with LoRA, precompute it. null: ``model.path``."""
    sync_every: int = 0
    """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): every this many optimizer steps the
    reference moves toward the policy, ``ref = sync_alpha * policy + (1 - sync_alpha) * ref``
    (TRL's ``sync_ref_model`` with ``ref_model_sync_steps``); 0: a fixed reference (DPO). Needs
    ``mode=online`` and full-weight training: a precomputed reference cannot move, and a LoRA
    reference is the policy with its adapters off, not a copy. Checkpoints keep the moved
    reference (``checkpoints/step_N/reference/``, a Hugging Face model) so a resume is exact."""
    sync_alpha: float = 0.6
    """TR-DPO's alpha (TRL's ``ref_model_mixup_alpha``): the policy's share of each update, in (0, 1]."""

    def __post_init__(self) -> None:
        _one_of(self.mode, "reference.mode", ("precompute", "online"))
        _one_of(self.partition, "reference.partition", ("auto", "replicate", "zero3"))
        _check(self.sync_every >= 0, "reference.sync_every", f"got {self.sync_every}, expected >= 0 (0: a fixed reference)")
        _check(0.0 < self.sync_alpha <= 1.0, "reference.sync_alpha", f"got {self.sync_alpha}, expected in (0, 1]")

    def syncs(self) -> bool:
        """Whether the reference moves during training (TR-DPO)."""
        return self.sync_every > 0

    def syncs_after(self, step: int) -> bool:
        """Whether the reference moves after optimizer step ``step`` (1-based), as TRL's callback
        does at the end of every ``ref_model_sync_steps``-th step."""
        return self.syncs() and step % self.sync_every == 0

    def moved_after(self, step: int) -> bool:
        """Whether the reference after ``step`` optimizer steps differs from the initial model."""
        return self.syncs() and step >= self.sync_every


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    mode: str = "offline"
    """offline (default, syncable later) | online | disabled."""
    project: str = "dpo_dist"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team)."""
    name: str | None = None
    """Run name; defaults to the output directory name."""

    def __post_init__(self) -> None:
        _one_of(self.mode, "wandb.mode", ("offline", "online", "disabled"))


JUDGE_NAMES = ("rule", "reward_model", "openai")


@dataclass
class JudgeConfig:
    """Who decides which of two responses is better (``judge=<name>`` picks a preset from conf/judge/)."""

    name: str = "rule"
    """rule: the bundled task's verifier (dpo_dist.tasks) | reward_model: a local sequence-classification
    model, higher score wins | openai: an OpenAI-compatible chat endpoint asked in both orders."""
    reward_model_path: str | None = None
    """judge=reward_model: local Hugging Face ``AutoModelForSequenceClassification`` directory (one label)."""
    tie_margin: float = 0.0
    """judge=reward_model: score differences at or below this are ties."""
    batch_size: int = 16
    """judge=reward_model: responses scored per forward pass."""
    base_url: str = "https://api.openai.com/v1"
    """judge=openai: API root; ``/chat/completions`` is appended (any OpenAI-compatible server)."""
    model: str | None = None
    """judge=openai: the judge model name sent with each request (required for judge=openai)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """judge=openai: name of the environment variable holding the API key; null sends no key
    (local servers). The key itself never goes into a config file."""
    timeout_s: float = 60.0
    """judge=openai: seconds before one HTTP request is abandoned (then retried)."""
    max_retries: int = 4
    """judge=openai: retries of a request after a timeout, connection error, 429 or 5xx."""
    backoff_s: float = 1.0
    """judge=openai: wait before the first retry; doubles on each further retry."""
    concurrency: int = 4
    """judge=openai: requests in flight at once."""
    max_tokens: int = 16
    """judge=openai: completion tokens allowed for a verdict (it should answer "A" or "B")."""
    price_input_per_mtok: float = 0.0
    """judge=openai: USD per million prompt tokens, for the logged cost estimate (0: not priced)."""
    price_output_per_mtok: float = 0.0
    """judge=openai: USD per million completion tokens, for the logged cost estimate."""

    def __post_init__(self) -> None:
        _one_of(self.name, "eval.judge.name", JUDGE_NAMES)
        _check(
            self.name != "reward_model" or bool(self.reward_model_path),
            "eval.judge.reward_model_path",
            "required for judge=reward_model (a local sequence-classification model directory)",
        )
        _check(self.name != "openai" or bool(self.model), "eval.judge.model", "required for judge=openai")
        _check(self.tie_margin >= 0, "eval.judge.tie_margin", "must be >= 0")
        _check(
            self.tie_margin == 0 or self.name == "reward_model",
            "eval.judge.tie_margin",
            f"only judge=reward_model has scores to compare (judge={self.name} gives verdicts): leave it at 0",
        )
        for key in ("batch_size", "concurrency", "max_tokens"):
            _check(getattr(self, key) >= 1, f"eval.judge.{key}", "must be >= 1")
        _check(self.timeout_s > 0, "eval.judge.timeout_s", "must be > 0")
        _check(self.max_retries >= 0, "eval.judge.max_retries", "must be >= 0")
        _check(self.backoff_s >= 0, "eval.judge.backoff_s", "must be >= 0")
        _check(
            self.base_url.startswith(("http://", "https://")),
            "eval.judge.base_url",
            f"must start with http:// or https://, got {self.base_url!r}",
        )


@dataclass
class EvalConfig:
    """Standalone evaluation (``dpo-eval``, ``dpo-eval winrate``) of a trained policy."""

    policy_path: str | None = None
    """Model to evaluate: a Hugging Face directory (e.g. a run's ``final/``) or a checkpoint
    directory (``checkpoints/step_N``, exported first); defaults to ``output_dir/final``."""
    output: str | None = None
    """Directory for ``winrate.json`` and ``winrate_samples.jsonl``; defaults to ``output_dir``.
    ``dpo-eval winrate`` runs its ranks from ``<output_dir>/winrate/`` so a run's own
    ``config.yaml`` is never overwritten."""
    max_prompts: int = 0
    """Win-rate: evaluate the first N held-out prompts (0: all of ``data.eval_path`` or of the
    records ``data.eval_split`` holds out)."""
    max_new_tokens: int = 64
    """Win-rate: generation length limit, in tokens, for policy and reference alike."""
    do_sample: bool = False
    """Win-rate: sample (True) or decode greedily (False, the default: deterministic)."""
    temperature: float = 1.0
    """Win-rate: sampling temperature (do_sample=true only)."""
    top_p: float = 1.0
    """Win-rate: nucleus sampling mass (do_sample=true only)."""
    seed: int = 0
    """Win-rate: sampling seed; a run is repeatable for the same seed and batch size, on any number of ranks."""
    batch_size: int = 16
    """Win-rate: prompts generated together on one rank (left-padded)."""
    shard_generation: bool = False
    """Win-rate: generate with the model partitioned over the ranks (ZeRO-3, ranks step together)
    instead of a full copy per rank: slower, but what a model too big for one device (70B) needs."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Win-rate judge (``judge=rule|reward_model|openai``, then ``eval.judge.*``)."""

    def __post_init__(self) -> None:
        _check(self.max_prompts >= 0, "eval.max_prompts", "must be >= 0")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")

    def resolved_policy_path(self, output_dir: str) -> str:
        return self.policy_path or str(Path(output_dir) / "final")

    def resolved_output(self, output_dir: str) -> str:
        return self.output or output_dir


@dataclass
class SFTFirstConfig:
    """Chain SFT -> DPO in one command: the SFT result is both the DPO policy init and its reference."""

    max_steps: int = 0
    """SFT optimizer steps before DPO (on the chosen responses of data.train_path); 0: no SFT stage."""
    lr: float | None = 2e-5
    """SFT learning rate (TRL's SFT default; conf/model/tiny.yaml sets 1e-3); null: optim.lr."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 0, "sft_first.max_steps", "must be >= 0")
        _check(self.lr is None or self.lr > 0, "sft_first.lr", "must be > 0")


@dataclass
class DPOConfig:
    """The whole config tree (``conf/config.yaml``)."""

    output_dir: str = "outputs/run"
    """Run directory: config.yaml, run_info.json, metrics.jsonl, checkpoints/, final/ (and with
    ``train.metric_for_best_model`` best.json and best/)."""
    stage: str = "dpo"
    """dpo: preference optimisation | sft: supervised fine-tuning on the chosen responses."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft_first: SFTFirstConfig = field(default_factory=SFTFirstConfig)

    def __post_init__(self) -> None:
        _one_of(self.stage, "stage", ("sft", "dpo"))
        _check(bool(str(self.output_dir).strip()), "output_dir", "is empty: give the run a directory")
        _check(
            self.train.micro_batch_tokens >= 2 * self.data.max_length,
            "train.micro_batch_tokens",
            f"must be >= 2 * data.max_length ({2 * self.data.max_length}) so any pair fits one micro-batch",
        )
        if self.reference.syncs() and self.stage == "dpo":
            self._check_moving_reference()
        if self.reference.model_path and self.stage == "dpo":
            self._check_reference_model()
        if self.train.metric_for_best_model is not None:
            self._check_best_model_metric()
        if self.model.dtype == "bf16":  # before any work; model.dtype=auto is checked on the device
            self.deepspeed.to_dict(bf16=True, grad_clip=self.optim.grad_clip)

    def _check_moving_reference(self) -> None:
        """TR-DPO's refusals (TRL refuses the same): the reference it moves must be a model copy."""
        key = "reference.sync_every"
        _check(self.loss.uses_reference(), key, f"loss={self.loss.name} uses no reference, so there is none to move")
        _check(
            self.reference.mode == "online",
            key,
            "needs reference.mode=online: precomputed reference log-probs are of the initial model and cannot move",
        )
        _check(
            not self.model.lora.enabled,
            key,
            "does not work with LoRA: its reference is the policy with the adapters off (or a continued adapter's "
            "frozen starting copy), not a model copy that can move",
        )

    def _check_reference_model(self) -> None:
        key = "reference.model_path"
        _check(self.loss.uses_reference(), key, f"loss={self.loss.name} uses no reference")
        _check(
            not (self.model.lora.enabled and self.reference.mode == "online"),
            key,
            "does not work with LoRA and reference.mode=online, whose reference is the policy with the "
            "adapters off: set reference.mode=precompute to score against another model",
        )

    def _check_best_model_metric(self) -> None:
        """``train.metric_for_best_model`` must be a metric this run's evals log."""
        key, metric = "train.metric_for_best_model", self.train.metric_for_best_model
        _check(self.data.sources()[1] is not None, key, "needs held-out pairs to evaluate: data.eval_path is null and data.eval_split is 0")
        if self.stage == "sft":
            _check(metric == "eval/loss", key, f"stage=sft logs eval/loss alone, got {metric}")
        elif metric in ("eval/nll_loss", "eval/pref_loss"):
            _check(self.loss.alpha > 0, key, f"{metric} is logged by losses with an NLL term only (loss.alpha > 0: rpo, orpo, cpo)")

    def reference_model_path(self) -> str:
        """The reference model's directory: ``reference.model_path``, else ``model.path``."""
        return self.reference.model_path or self.model.path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def uses_tail_logps(self) -> bool:
        """Whether forwards also sum each response's tail, for LD-DPO (``loss.ld_alpha``): DPO runs
        only, since an SFT stage (``sft_first``) shares the loss settings of the DPO one but no loss."""
        return self.stage == "dpo" and self.loss.ld_alpha is not None

    def stages(self) -> list[DPOConfig]:
        """The runs this config stands for: itself, or with ``sft_first.max_steps > 0`` an SFT run
        into ``output_dir/sft`` followed by DPO from (and against) its exported model."""
        if self.stage == "sft" or self.sft_first.max_steps == 0:
            return [self]
        sft_dir = str(Path(self.output_dir) / "sft")
        # The DPO stage trains from sft/final with its own model.lora, so with LoRA that must be the
        # merged model: an adapter-only export there would make it continue the SFT adapter instead.
        lora = dataclasses.replace(self.model.lora, merge_on_export=True)
        sft = dataclasses.replace(
            self,
            stage="sft",
            output_dir=sft_dir,
            model=dataclasses.replace(self.model, lora=lora),
            sft_first=SFTFirstConfig(),
            # The DPO stage starts from sft/final, the last step: a best SFT model would go unused.
            train=dataclasses.replace(self.train, max_steps=self.sft_first.max_steps, epochs=None, metric_for_best_model=None),
            optim=dataclasses.replace(self.optim, lr=self.sft_first.lr or self.optim.lr),
        )
        final = str(Path(sft_dir) / "final")
        dpo = dataclasses.replace(
            self, sft_first=SFTFirstConfig(), model=dataclasses.replace(self.model, path=final, tokenizer_path=final)
        )
        return [sft, dpo]


def _build(cls, values: dict[str, Any], prefix: str):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with the dotted key name."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{dotted}: unknown config key")
        sub = _SUBCONFIGS.get((cls, key))
        kwargs[key] = _build(sub, value or {}, dotted + ".") if sub else value
    return cls(**kwargs)


_SUBCONFIGS = {
    (DPOConfig, "model"): ModelConfig,
    (DPOConfig, "data"): DataConfig,
    (DPOConfig, "loss"): LossConfig,
    (DPOConfig, "optim"): OptimConfig,
    (DPOConfig, "deepspeed"): DeepSpeedConfig,
    (DPOConfig, "cluster"): ClusterConfig,
    (DPOConfig, "train"): TrainConfig,
    (DPOConfig, "reference"): ReferenceConfig,
    (DPOConfig, "wandb"): WandbConfig,
    (DPOConfig, "eval"): EvalConfig,
    (DPOConfig, "sft_first"): SFTFirstConfig,
    (ModelConfig, "lora"): LoraConfig,
    (EvalConfig, "judge"): JudgeConfig,
}


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.max_steps": 3, "output_dir": "x"}`` -> ``{"train": {"max_steps": 3}, "output_dir": "x"}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return nested


def config_from_dict(values: dict[str, Any]) -> DPOConfig:
    """A validated ``DPOConfig`` from plain nested dicts (a resolved Hydra config or a saved config.yaml)."""
    return _build(DPOConfig, values, "")
