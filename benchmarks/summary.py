"""What run.py reports from its rounds: each side's medians, the median pairwise ratio with its range, the targets.

A round is one reference run and one shardtrain run, back to back. Its ratio compares two runs
that saw nearly the same load on the machine; the median over rounds then drops the rounds that
did not. Each side's own figures are summarised by their median too, so a side's row and the
ratio row need not divide exactly (the median of ratios is not the ratio of medians).
"""

from __future__ import annotations

import statistics

SIDES = ("reference", "shardtrain")
#: shardtrain / reference, median over the rounds: tokens/s at least this, peak memory at most this.
TOKENS_PER_SEC_TARGET = 0.98
PEAK_MEMORY_TARGET = 1.05
#: ratio name -> the figure it divides (shardtrain's over the reference's)
RATIOS = {"ratio_tokens_per_sec": "tokens_per_sec", "ratio_peak_memory": "peak_memory_per_rank_bytes"}


def pair(reference: dict, shardtrain: dict, order: tuple[str, ...]) -> dict:
    """One round: both sides' raw figures, which ran first, and the ratios."""
    result = {"order": list(order), "reference": reference, "shardtrain": shardtrain}
    for ratio, figure in RATIOS.items():
        result[ratio] = shardtrain[figure] / reference[figure]
    if "deepspeed_config" in reference or "deepspeed_config" in shardtrain:
        result["same_deepspeed_config"] = reference.get("deepspeed_config") == shardtrain.get("deepspeed_config")
    return result


def summarise(rounds: list[dict]) -> dict:
    """One configuration's entry in results.json: medians, ratios with their ranges, targets, and the rounds."""
    entry: dict = {side: side_summary([r[side] for r in rounds]) for side in SIDES}
    for ratio in RATIOS:
        values = [r[ratio] for r in rounds]
        entry[ratio] = statistics.median(values)
        entry[f"{ratio}_range"] = [min(values), max(values)]
    entry["meets_tokens_per_sec_target"] = entry["ratio_tokens_per_sec"] >= TOKENS_PER_SEC_TARGET
    entry["meets_peak_memory_target"] = entry["ratio_peak_memory"] <= PEAK_MEMORY_TARGET
    if any("same_deepspeed_config" in r for r in rounds):
        entry["same_deepspeed_config"] = all(r.get("same_deepspeed_config", False) for r in rounds)
    entry["rounds"] = rounds
    return entry


def side_summary(runs: list[dict]) -> dict:
    """The median of each numeric figure over the rounds (the monitor's too); other values from the first round."""
    summary = {key: _median(key, [r[key] for r in runs]) for key in runs[0]}
    for figure in RATIOS.values():
        summary[f"{figure}_range"] = [min(r[figure] for r in runs), max(r[figure] for r in runs)]
    return summary


def _median(key: str, values: list) -> object:
    if all(_is_number(v) for v in values):
        return statistics.median(values)
    if all(isinstance(v, dict) and all(_is_number(x) for x in v.values()) for v in values):
        return {name: statistics.median(v[name] for v in values) for name in values[0]}
    return values[0]  # the same in every round: a peak's source, the DeepSpeed config


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def print_report(report: dict) -> None:
    rounds = report.get("rounds", 1)
    print(
        f"\n{report['model']}, {report['devices']} processes, {report['precision']}, {report['steps']} steps "
        f"({report['warmup']} warm-up), malloc {report['malloc']}, {rounds} round(s) of reference and shardtrain "
        f"in alternating order; peak {report['peak_flops_per_device'] / 1e9:,.0f} GFLOP/s per device ({report['peak_source']})"
    )
    if report["configs"]:
        print("\nmedians over the rounds")
        print(
            f"{'config':9}{'side':12}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'step (s)':>10}{'spread':>8}{'peak MiB/rank':>15}"
        )
    for name, entry in report["configs"].items():
        for side in SIDES:
            r = entry[side]
            print(
                f"{name:9}{side:12}{r['tokens_per_sec']:10.0f}{r['model_flops_per_sec'] / 1e9:9.1f}{r['mfu']:7.1%}"
                f"{r['step_time_median']:10.3f}{r['step_time_spread']:8.3f}{r['peak_memory_per_rank_bytes'] / 2**20:15.0f}"
            )
    if report["configs"]:
        print("\nratio shardtrain / reference: median over the rounds, range (min-max), target met, each round's")
        print(
            f"{'config':9}{'tokens/s':>9}  {'range':13}{f'>={TOKENS_PER_SEC_TARGET}':8}"
            f"{'memory':>8}  {'range':13}{f'<={PEAK_MEMORY_TARGET}':8}  tokens/s ratio per round"
        )
    for name, entry in report["configs"].items():
        tokens, memory = entry["ratio_tokens_per_sec_range"], entry["ratio_peak_memory_range"]
        per_round = " ".join(f"{r['ratio_tokens_per_sec']:.3f}" for r in entry["rounds"])
        print(
            f"{name:9}{entry['ratio_tokens_per_sec']:9.3f}  {tokens[0]:.3f}-{tokens[1]:.3f}  "
            f"{_mark(entry['meets_tokens_per_sec_target']):8}"
            f"{entry['ratio_peak_memory']:8.3f}  {memory[0]:.3f}-{memory[1]:.3f}  "
            f"{_mark(entry['meets_peak_memory_target']):8}  {per_round}"
        )
    layouts = {n: (e["devices"], e["batch_size_per_rank"]) for n, e in report["configs"].items() if "devices" in e}
    if any(layout != (report["devices"], report["batch_size_per_rank"]) for layout in layouts.values()):
        print("\nprocesses and sequences per process: " + ", ".join(f"{n} {d} x {b}" for n, (d, b) in layouts.items()))
    if "wall_seconds" in report:
        print(f"the rounds took {report['wall_seconds'] / 60:.1f} minutes")
    for name, entry in report["configs"].items():
        if entry.get("same_deepspeed_config") is False:
            print(f"warning: {name}: the two sides passed different DeepSpeed configs (see results.json)")
    for name, runs in report["scaling"].items():
        print(
            f"\nscaling, shardtrain {name}:  "
            + "   ".join(
                f"{devices} proc: {r['peak_memory_per_rank_bytes'] / 2**20:.0f} MiB/rank, step {r['step_time_median']:.3f} s, {r['tokens_per_sec']:.0f} tokens/s"
                for devices, r in runs.items()
            )
        )


def _mark(met: bool) -> str:
    return "pass" if met else "FAIL"
