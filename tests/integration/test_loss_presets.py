"""Loss presets through `dpo-train` against log-probs computed here from plain HF forwards.

Each run trains one step (or a few) on 1 rank, on a train file of 8 pairs with
train.pairs_per_step=8: step 1 sees every pair of the file (a permutation of them), so its
per-pair means can be recomputed independently of the engine's sampling, packing and
normalisation: per pair, the summed log-probs and token counts of the chosen and rejected
responses from an unpacked, unchunked forward of the tiny model (policy == reference at step 1).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_pairs_jsonl, make_tiny_model_dir, run_cli, tiny_run_overrides

pytestmark = pytest.mark.integration

TRAIN_PAIRS = 8  # = train.pairs_per_step of TINY_RUN: step 1 sees them all


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {
        "model": make_tiny_model_dir(root / "model"),
        "train": make_pairs_jsonl(root / "train.jsonl", TRAIN_PAIRS, seed=1),
        "eval": make_pairs_jsonl(root / "eval.jsonl", 8, seed=2),
        "cache": root / "refcache",
    }


@pytest.fixture(scope="module")
def hf_logps(assets):
    """Per pair of the train file: (chosen summed log-prob, chosen tokens, rejected summed
    log-prob, rejected tokens), the responses' tokens scored by a plain HF forward in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.data import load_tokenized

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    data = load_tokenized(assets["train"], tokenizer, max_length=64)
    assert len(data) == TRAIN_PAIRS  # nothing dropped: step 1 is every pair of the file
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()

    def response_logp(prompt, response) -> tuple[float, int]:
        ids = torch.tensor([*prompt, *response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
        scored = torch.arange(len(prompt) - 1, len(ids) - 1)  # each position predicts the next token
        return logp[scored, ids[scored + 1]].sum().item(), len(response)

    rows = []
    for i in range(len(data)):
        pair = data[i]
        rows.append((*response_logp(pair.prompt_ids, pair.chosen_ids), *response_logp(pair.prompt_ids, pair.rejected_ids)))
    hf_logps_aligned.update(
        (i, tuple(aligned_logp(model, data[i].prompt_ids, response) for response in (data[i].chosen_ids, data[i].rejected_ids)))
        for i in range(len(data))
    )
    # The check below is only as strong as the pairs differ in length (mean vs sum, per-response vs
    # batch-wide token means): they do.
    assert len({c_n for _, c_n, _, _ in rows}) > 1
    return rows


hf_logps_aligned: dict[int, tuple[float, float]] = {}
"""Filled by ``hf_logps``: per pair, WPO's aligned log-prob (mean over the response of log p(token)
- log sum_v p(v)^2) of the chosen and the rejected response."""


def aligned_logp(model, prompt, response) -> float:
    ids = torch.tensor([*prompt, *response])
    with torch.no_grad():
        probs = torch.softmax(model(ids[None]).logits[0].double(), dim=-1)
    scored = torch.arange(len(prompt) - 1, len(ids) - 1)
    token_p = probs[scored, ids[scored + 1]]
    return (torch.log(token_p) - torch.log((probs[scored] ** 2).sum(dim=-1))).mean().item()


def train(assets, out, **extra) -> list[dict]:
    settings = {"output_dir": out, "reference.cache_dir": assets["cache"], "train.max_steps": 1, **extra}
    result = run_cli("launch.train", *tiny_run_overrides(assets, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(rows):
    return [r for r in rows if "loss" in r]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_ipo_mean_normalised_loss_at_init_is_its_target_squared(assets, tmp_path):
    """loss=ipo (beta 0.1, per-token means): policy == reference, so the margin is 0 and the loss
    (0 - 1/(2 beta))^2 = 25. The reference store keeps sums: divided by the policy's token counts
    like the policy's own mean log-probs, or the margin is not 0."""
    first = train_rows(train(assets, tmp_path / "ipo", loss="ipo"))[0]
    beta = 0.1  # conf/loss/ipo.yaml
    assert first["step"] == 1
    assert abs(first["loss"] - (1 / (2 * beta)) ** 2) < 1e-5, first
    assert abs(first["reward_margin"]) < 1e-7 and first["reward_accuracy"] == 0.0


def test_simpo_is_reference_free_on_mean_token_logps(assets, hf_logps, tmp_path):
    """loss=simpo (beta 2, gamma 0.5): -logsigmoid(beta * (mean chosen - mean rejected token
    log-prob) - gamma) averaged over the step's pairs; no reference is computed or read."""
    out = tmp_path / "simpo"
    first = train_rows(train(assets, out, loss="simpo"))[0]
    beta, gamma = 2.0, 0.5  # conf/loss/simpo.yaml
    margins = [beta * (c / c_n - r / r_n) - gamma for c, c_n, r, r_n in hf_logps]
    expected = mean(-F.logsigmoid(torch.tensor(m, dtype=torch.float64)).item() for m in margins)
    assert math.isclose(first["loss"], expected, rel_tol=1e-5), (first["loss"], expected)
    # Rewards of a reference-free loss: beta * the policy's mean log-prob.
    assert math.isclose(first["chosen_reward"], mean(beta * c / c_n for c, c_n, _, _ in hf_logps), rel_tol=1e-5)
    # The logged log-probs stay the summed ones whatever the loss's normalisation.
    assert math.isclose(first["chosen_logp"], mean(c for c, _, _, _ in hf_logps), rel_tol=1e-5)
    assert math.isclose(first["rejected_logp"], mean(r for _, _, r, _ in hf_logps), rel_tol=1e-5)
    info = json.loads((out / "run_info.json").read_text())
    assert info["loss"] == "simpo"
    assert info["reference"] == {"cache_dir": None, "computed": False, "mode": "none"}


@pytest.mark.parametrize("name", ["orpo", "cpo"])
def test_orpo_and_cpo_are_reference_free_preferences_plus_the_chosen_nll(assets, hf_logps, tmp_path, name):
    """loss=orpo (beta 0.1, alpha 1, per-token means): the chosen response's NLL per token minus
    beta * log sigmoid(log odds ratio), odds = P / (1 - P), P = exp(mean log-prob) (Hong et al.
    eq. 6-7). loss=cpo (beta 0.1, alpha 1, sums): -log sigmoid(beta * (chosen - rejected summed
    log-prob)) plus the same NLL (Xu et al.). Averaged over the step's pairs; no reference."""
    out = tmp_path / name
    first = train_rows(train(assets, out, loss=name))[0]
    beta, alpha = 0.1, 1.0  # conf/loss/orpo.yaml, conf/loss/cpo.yaml

    def preference(c, c_n, r, r_n) -> float:
        if name == "cpo":
            return -F.logsigmoid(torch.tensor(beta * (c - r), dtype=torch.float64)).item()
        p_c, p_r = math.exp(c / c_n), math.exp(r / r_n)
        log_odds = math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))
        return -beta * F.logsigmoid(torch.tensor(log_odds, dtype=torch.float64)).item()

    expected = mean(preference(*row) + alpha * -row[0] / row[1] for row in hf_logps)
    assert math.isclose(first["loss"], expected, rel_tol=1e-5), (first["loss"], expected)
    per_token = name == "orpo"
    want_reward = mean(beta * (c / c_n if per_token else c) for c, c_n, _, _ in hf_logps)
    assert math.isclose(first["chosen_reward"], want_reward, rel_tol=1e-5), (first["chosen_reward"], want_reward)
    info = json.loads((out / "run_info.json").read_text())
    assert info["loss"] == name
    assert info["reference"] == {"cache_dir": None, "computed": False, "mode": "none"}


def test_rpo_adds_alpha_times_the_per_token_nll_of_each_chosen_response(assets, hf_logps, tmp_path):
    """loss=rpo loss.alpha=1: DPO (ln 2 at init) + alpha * the chosen response's NLL per token,
    each response by its own length (RPO eq. 1; losses.sft_nll), averaged over the step's pairs."""
    alpha = 1.0
    first = train_rows(train(assets, tmp_path / "rpo", loss="rpo", **{"loss.alpha": alpha}))[0]
    nll = mean(-c / c_n for c, c_n, _, _ in hf_logps)
    expected = math.log(2) + alpha * nll
    assert math.isclose(first["loss"], expected, rel_tol=1e-5), (first["loss"], expected, nll)
    assert abs(first["reward_margin"]) < 1e-7  # the preference part is still DPO's at margin 0
    # chosen_logp is the summed (not per-token) log-prob even when the loss uses a per-token NLL.
    assert math.isclose(first["chosen_logp"], mean(c for c, _, _, _ in hf_logps), rel_tol=1e-5)


def test_mpo_is_the_weighted_sum_of_its_terms_plus_the_nll(assets, hf_logps, tmp_path):
    """loss=mpo: 0.8 DPO + 0.2 BCO + 1.0 * the chosen NLL per token. At init (policy == reference)
    DPO is ln 2 and BCO's -log sigmoid(0) - log sigmoid(-0) is 2 ln 2; run_info names the terms."""
    out = tmp_path / "mpo"
    first = train_rows(train(assets, out, loss="mpo"))[0]
    nll = mean(-c / c_n for c, c_n, _, _ in hf_logps)
    expected = 0.8 * math.log(2) + 0.2 * 2 * math.log(2) + 1.0 * nll
    assert math.isclose(first["loss"], expected, rel_tol=1e-5), (first["loss"], expected, nll)
    info = json.loads((out / "run_info.json").read_text())
    assert info["loss"] == "sigmoid" and info["loss_weights"] == {"sigmoid": 0.8, "bco_pair": 0.2}


def test_wpo_weights_the_pairs_by_their_aligned_probability(assets, hf_logps, tmp_path):
    """loss.use_weighting=true: at init (policy == reference) each pair's DPO loss ln 2 times
    exp(aligned chosen + aligned rejected), WPO's weight from the policy's own softmax."""
    first = train_rows(train(assets, tmp_path / "wpo", **{"loss.use_weighting": "true"}))[0]
    weights = [math.exp(c + r) for c, r in hf_logps_aligned.values()]
    assert len(weights) == TRAIN_PAIRS and max(weights) / min(weights) > 1.01  # unequal: the weighting shows
    expected = mean(math.log(2) * w for w in weights)
    assert math.isclose(first["loss"], expected, rel_tol=1e-5), (first["loss"], expected)


def test_disable_dropout_makes_step_one_the_reference(assets, tmp_path):
    """A model whose config asks for attention dropout (0.5): with model.disable_dropout (default)
    the policy at step 1 scores exactly as the precomputed reference (no dropout there), DPO's loss
    is ln 2; with it off the train-mode policy draws dropout masks and the loss moves off ln 2.
    (That also shows the policy trains in train mode from step 1: from_pretrained returns the model
    in eval mode, and dropout, LoRA's too, used to stay off until the first evaluation.)"""
    import shutil

    model_dir = tmp_path / "dropout_model"
    shutil.copytree(assets["model"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.5}))
    common = {"model.path": model_dir, "model.attn_backend": "sdpa", "reference.cache_dir": tmp_path / "cache"}
    on = train_rows(train(assets, tmp_path / "on", **common))[0]
    off = train_rows(train(assets, tmp_path / "off", **common, **{"model.disable_dropout": "false"}))[0]
    assert abs(on["loss"] - math.log(2)) < 1e-6, on
    assert abs(off["loss"] - math.log(2)) > 1e-3, off
    # The export keeps the model's own setting: dropout was off for this run only.
    assert json.loads((tmp_path / "on" / "final" / "config.json").read_text())["attention_dropout"] == 0.5


def test_logged_lr_follows_the_schedule_and_logps_are_summed(assets, hf_logps, tmp_path):
    """optim.warmup_steps=2 over 6 steps (cosine, min_lr_ratio 0.1, the defaults): warmup step k
    runs at (k+1)/3 * lr, step 2 at lr, then cosine down to 0.1 * lr at the last step. Step 1's
    chosen_logp / rejected_logp are the step's mean summed response log-probs. run_info.json
    records the versions this process imports too."""
    lr = 1e-3
    out = tmp_path / "sched"
    rows = train_rows(train(assets, out, **{"optim.lr": lr, "optim.warmup_steps": 2, "train.max_steps": 6}))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Steps 3..6 are progress 0, 1/3, 2/3, 1 of the cosine: 0.1 + 0.9 * (1 + cos(pi * p)) / 2
    # (a linear decay would give 0.7 and 0.4 at 1/3 and 2/3).
    expected = [lr / 3, 2 * lr / 3, lr, 0.775 * lr, 0.325 * lr, 0.1 * lr]
    for row, want in zip(rows, expected):
        assert math.isclose(row["lr"], want, rel_tol=1e-9), (row["step"], row["lr"], want)
    first = rows[0]
    assert math.isclose(first["chosen_logp"], mean(c for c, _, _, _ in hf_logps), rel_tol=1e-5)
    assert math.isclose(first["rejected_logp"], mean(r for _, _, r, _ in hf_logps), rel_tol=1e-5)
    import deepspeed

    info = json.loads((out / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["deepspeed"] == deepspeed.__version__


def test_eval_of_the_reference_itself_is_chance(assets, tmp_path):
    """dpo-eval with the reference model as the policy: every margin is 0, so eval/loss is ln 2,
    the margin 0 and no pair counts as ranked right (a tie is not a win)."""
    out = tmp_path / "ev"
    settings = {"output_dir": out, "reference.cache_dir": assets["cache"], "eval.policy_path": assets["model"]}
    result = run_cli("launch.eval", *tiny_run_overrides(assets, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["eval_pairs"] == 8
    assert abs(evaluated["eval/loss"] - math.log(2)) < 1e-6, evaluated
    assert abs(evaluated["eval/reward_margin"]) < 1e-7, evaluated
    assert evaluated["eval/reward_accuracy"] == 0.0, evaluated


def make_uneven_pairs_jsonl(path, n: int, seed: int):
    """``n`` arithmetic pairs whose responses differ in length either way (or not: every third),
    so that LD-DPO's tails are not all empty."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            answer = str(a + b)
            longer = f"{a + b + 1}, since {a} plus {b} carries one"
            chosen, rejected = [(answer, str(a + b + 1)), (answer, longer), (f"{answer}, that is {a} plus {b}", longer[:4])][i % 3]
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def hf_ld_logps(model_dir, data_path, ld_alpha: float) -> list[tuple[float, float]]:
    """Per pair of ``data_path``: LD-DPO's (chosen, rejected) log-probs under the model at
    ``model_dir``, from a plain HF forward per response in float64: the sum over the first
    min(chosen, rejected) response tokens plus ld_alpha times the rest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.data import load_tokenized

    data = load_tokenized(data_path, AutoTokenizer.from_pretrained(model_dir), max_length=64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for pair in data:
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
        sides = []
        for response in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([*pair.prompt_ids, *response])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
            scored = torch.arange(len(pair.prompt_ids) - 1, len(ids) - 1)
            tokens = logp[scored, ids[scored + 1]]
            sides.append((tokens[:shared].sum() + ld_alpha * tokens[shared:].sum()).item())
        rows.append(tuple(sides))
    return rows


def test_ld_dpo_trains_from_ln2_and_evaluates_on_ld_log_probs(assets, tmp_path):
    """loss.ld_alpha=0.5 with a precomputed reference: the cache (train and eval splits) gets the
    tail columns, step 1 (policy == reference) has loss ln 2 and margin 0, and the loss falls over
    the steps; reference.mode=online trains the same. dpo-eval of another model against that cache
    scores LD-DPO's log-probs on both sides, as a plain HF forward computes them (TRL evaluates on
    the same log-probs it trains on)."""
    import pyarrow as pa

    from tests.helpers import make_tiny_model_dir

    data = {
        "train": make_uneven_pairs_jsonl(tmp_path / "train.jsonl", 8, seed=3),
        "eval": make_uneven_pairs_jsonl(tmp_path / "eval.jsonl", 6, seed=4),
    }
    ld_assets = {**assets, **data}
    cache = tmp_path / "cache"
    settings = {"output_dir": tmp_path / "ld", "reference.cache_dir": cache, "loss.ld_alpha": 0.5, "train.max_steps": 4}
    result = run_cli("launch.train", *tiny_run_overrides(ld_assets, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ld" / "metrics.jsonl").read_text().splitlines()]
    steps = train_rows(rows)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and abs(steps[0]["reward_margin"]) < 1e-7, steps[0]
    assert steps[-1]["step"] == 4 and steps[-1]["loss"] < steps[0]["loss"] - 0.01, steps
    assert "eval/reward_accuracy" in rows[-1]
    for shard in [*cache.glob("part-*.arrow"), *cache.glob("eval-*/part-*.arrow")]:
        names = pa.ipc.open_file(pa.memory_map(str(shard))).schema.names
        assert names[-2:] == ["chosen_tail_logp", "rejected_tail_logp"], shard
    assert list(cache.glob("eval-*/part-*.arrow"))
    # An online reference computes the same tail sums: the same training.
    settings = {**settings, "output_dir": tmp_path / "online", "reference.mode": "online"}
    result = run_cli("launch.train", *tiny_run_overrides(ld_assets, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    online = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, online, strict=True):
        for key in ("loss", "chosen_reward", "rejected_reward", "eval/loss", "eval/reward_margin"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (a["step"], key, a[key], b[key])

    policy = make_tiny_model_dir(tmp_path / "policy", seed=5)
    settings = {"output_dir": tmp_path / "ev", "reference.cache_dir": cache, "loss.ld_alpha": 0.5, "eval.policy_path": policy}
    result = run_cli("launch.eval", *tiny_run_overrides(ld_assets, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "ev" / "eval.json").read_text())

    def margins(ld_alpha: float) -> list[float]:
        sides = zip(hf_ld_logps(policy, data["eval"], ld_alpha), hf_ld_logps(assets["model"], data["eval"], ld_alpha))
        return [0.1 * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in sides]

    def dpo_loss(margins: list[float]) -> float:
        return mean(-F.logsigmoid(torch.tensor(m, dtype=torch.float64)).item() for m in margins)

    expected = dpo_loss(margins(0.5))
    assert math.isclose(evaluated["eval/loss"], expected, rel_tol=1e-5), (evaluated["eval/loss"], expected)
    assert math.isclose(evaluated["eval/reward_margin"], mean(margins(0.5)), rel_tol=1e-4, abs_tol=1e-6), evaluated
    assert abs(dpo_loss(margins(1.0)) - expected) > 1e-3  # plain DPO's would not do: the tails matter here
