"""Markdown tables of a ``dpo-bench`` JSON, and the issue's targets checked against it.

    python tools/bench_table.py benchmarks/h100-1b.json

Prints the systems table and the micro-batch scaling table as they appear in
``benchmarks/README.md``, then one line per target (ratios vs TRL, MFU, peak memory) saying
whether it is met; exits 1 when a target is missed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {
    "ours_precomputed": "ours, precomputed reference",
    "ours_online": "ours, online reference",
    "trl_online": "TRL `DPOTrainer` defaults (online, padded)",
    "trl_precomputed": "TRL `precompute_ref_log_probs=True`",
    "ours_reference_pass": "ours, reference pass alone (forward only)",
}
VERSUS = {"ours_precomputed": "trl_precomputed", "ours_online": "trl_online",
          "trl_online": "trl_online", "trl_precomputed": "trl_precomputed"}
# Required tokens/s ratios vs TRL, by preset family (issue #8), and the GPU MFU floor.
RATIO_TARGETS = {"cpu": {"ours_online": 1.3, "ours_precomputed": 1.3},
                 "gpu": {"ours_online": 1.5, "ours_precomputed": 1.3}}
MFU_TARGET = 0.45


def _num(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _measured(system: object) -> bool:
    """Numbers of a system that ran: not an error record (``{"error": ...}``) nor a string
    (``"skipped (...)"``, or ``"error: ..."`` in JSONs written before error records were dicts)."""
    return isinstance(system, dict) and "error" not in system


def _not_measured(system: object) -> str:
    """The table cell of a system without numbers."""
    if isinstance(system, dict):
        error = str(system["error"])
        return error if error.startswith("skipped") else f"error: {error}"
    return str(system)


def systems_table(report: dict) -> list[str]:
    systems = report["systems"]
    memory = "peak GPU memory (GB)" if "cpu" not in report["device"] else "peak RSS (GB)"
    lines = [f"| system | real tokens/s | vs TRL | MFU | {memory} | step-0 loss |", "|---|---:|---:|---:|---:|---:|"]
    config = report.get("config", {})
    trl_changes = ", ".join(
        [f"{k}={v}" for k, v in config.get("trl_overrides", {}).items()]
        + (["fp32 weights"] if config.get("trl_fp32_weights") else [])
    )
    labels = dict(LABELS)
    if trl_changes:
        labels["trl_online"] = f"TRL `DPOTrainer`, {trl_changes} (online, padded)"
        labels["trl_precomputed"] = f"TRL `precompute_ref_log_probs=True`, {trl_changes}"
    for name, label in labels.items():
        system = systems.get(name)
        if system is None:
            continue
        if not _measured(system):
            lines.append(f"| {label} | {_not_measured(system)} | | | | |")
            continue
        theirs = systems.get(VERSUS.get(name, ""))
        ratio = ""
        if _measured(theirs) and theirs["tokens_per_s"]:
            ratio = f"{system['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
            ratio = f"**{ratio}**" if name.startswith("ours") else ratio
        loss = "" if system["step0_loss"] is None else f"{system['step0_loss']:.6f}"
        lines.append(f"| {label} | {_num(system['tokens_per_s'])} | {ratio} | {_num(system['mfu'], 3)} | "
                     f"{system['peak_mem_gb']:.2f} | {loss} |")
    return lines


def scaling_table(report: dict) -> list[str]:
    lines = ["| micro_batch_tokens | tokens/s | MFU | peak memory (GB) |", "|---:|---:|---:|---:|"]
    for tokens, system in sorted(report.get("scaling_micro_batch_tokens", {}).items(), key=lambda kv: int(kv[0])):
        if not _measured(system):
            lines.append(f"| {int(tokens):,} | {_not_measured(system)} | | |")
        else:
            lines.append(f"| {int(tokens):,} | {_num(system['tokens_per_s'])} | {_num(system['mfu'], 3)} | "
                         f"{system['peak_mem_gb']:.2f} |")
    return lines


def targets(report: dict) -> list[tuple[str, bool]]:
    """(line, met) for every target of the report's preset family (gpu-* or cpu-*)."""
    family = "gpu" if report["preset"].startswith("gpu") else "cpu"
    systems = report["systems"]
    out = []
    for ours, needed in RATIO_TARGETS[family].items():
        theirs = VERSUS[ours]
        a, b = systems.get(ours), systems.get(theirs)
        if not (_measured(a) and _measured(b) and b["tokens_per_s"]):
            out.append((f"{ours}/{theirs}: not measured (target >= {needed}x)", False))
            continue
        ratio = a["tokens_per_s"] / b["tokens_per_s"]
        out.append((f"{ours}/{theirs}: {ratio:.2f}x (target >= {needed}x)", ratio >= needed))
    if family == "gpu":
        pre = systems.get("ours_precomputed")
        mfu = pre.get("mfu") if _measured(pre) else None
        out.append((f"MFU of ours_precomputed: {_num(mfu, 3) or 'n/a'} (target >= {MFU_TARGET})",
                    mfu is not None and mfu >= MFU_TARGET))
        ours_peak = max((s["peak_mem_gb"] for n, s in systems.items() if n.startswith("ours") and _measured(s)), default=None)
        trl_peak = min((s["peak_mem_gb"] for n, s in systems.items() if n.startswith("trl") and _measured(s)), default=None)
        met = ours_peak is not None and trl_peak is not None and ours_peak <= trl_peak
        out.append((f"peak memory: ours at most {_num(ours_peak, 1)} GB, TRL at least {_num(trl_peak, 1)} GB "
                    "(target: ours <= TRL)", met))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tools/bench_table.py BENCH.json", file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    print("\n".join(systems_table(report)))
    print()
    print("\n".join(scaling_table(report)))
    print()
    checked = targets(report)
    for line, met in checked:
        print(f"{'met ' if met else 'MISSED'} {line}")
    return 0 if all(met for _, met in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
