"""The report of a ``slaq bench chaos`` run: the serve report's figures per tier, the
reconciliation with the ledger, the reprioritiser's cycle times, and a timeline plot with the
injected faults marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slaq.bench.serve import FINISHED, ReplayResult
from slaq.bench.serve_report import _pyplot, percentile, write_report
from slaq.platform.tiers import TIER_NAMES, TierTable

# Issue 4's bar for the real-stack run.
PRIORITY_ATTAINMENT_GOAL = 0.99
CYCLE_P99_GOAL_MS = 50.0


def _tier_summary(t: dict[str, Any]) -> dict[str, Any]:
    return {k: t[k] for k in ("sent", "finished", "refused", "lost", "downgraded",
                              "sla_attainment", "ttft_attainment", "attainment_of_finished",
                              "goodput")} | {
        "ttft_ms": {"p50": t["ttft_ms"]["p50"], "p99": t["ttft_ms"]["p99"]},
        "tpot_ms": {"p50": t["tpot_ms"]["p50"], "p99": t["tpot_ms"]["p99"]}}


def cycle_stats(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000.0 for s in seconds]
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms) if ms else None}


def plot_timeline(replay: ReplayResult, events: list[dict[str, Any]], tiers: TierTable,
                  path: str | Path) -> Path:
    """TTFT of each request by send time (log scale), per tier, with the faults marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, tier in enumerate(TIER_NAMES):
        done = [r for r in replay.results if r.tier_asked == tier and r.outcome == FINISHED
                and r.ttft_s is not None and r.sent_s is not None]
        if done:
            ax.scatter([r.sent_s for r in done], [r.ttft_s * 1000.0 for r in done], s=4,
                       color=f"C{i}", alpha=0.6, label=f"{tier} (target {tiers[tier].ttft_ms:g} ms)")
    others = [r for r in replay.results if r.outcome != FINISHED]
    if others:
        ax.scatter([r.sent_s or r.arrival_s for r in others], [1.0] * len(others), marker="x",
                   color="k", label="refused / lost")
    for e in events:
        ax.axvline(e["t_s"], color="red", linestyle="--", linewidth=1)
        ax.annotate(e["kind"], (e["t_s"], 0.98), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="red")
    ax.set_yscale("log")
    ax.set_xlabel("send time (s since the replay started)")
    ax.set_ylabel("TTFT (ms, log)")
    ax.set_title("chaos run: TTFT per request; red: SIGKILL of a worker, Redis restart")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def build_chaos_report(replay: ReplayResult, recon: dict[str, Any], *,
                       cycle_seconds: list[float], prometheus: dict[str, Any] | None,
                       events: list[dict[str, Any]], decisions: dict[str, int],
                       still_active: int, config: dict[str, Any], trace_meta: dict[str, Any],
                       tiers: TierTable, out_dir: Path, plot: bool) -> dict[str, Any]:
    """Write ``report.json`` (serve's), ``chaos.json`` and the plots; return the chaos dict."""
    serve = write_report(replay, out_dir, tiers=tiers, label="chaos",
                         meta={"trace": trace_meta}, plot=plot)
    cycles = cycle_stats(cycle_seconds)
    per_tier = {t: _tier_summary(v) for t, v in serve["tiers"].items()}
    prio = per_tier.get("priority", {}).get("sla_attainment")
    report: dict[str, Any] = {
        "trace": trace_meta, "events": events, "duration_s": replay.duration_s,
        "per_tier": per_tier, "overall": _tier_summary(serve["overall"]),
        "lost": {"client": recon["lost_client"], "ledger": recon["lost_ledger"]},
        "reconciliation": recon, "still_active_in_ledger": still_active,
        "reprioritiser_cycles": {**cycles, "prometheus": prometheus},
        "decisions": decisions,
        "goals": {
            "priority_attainment>=0.99": prio is not None and prio >= PRIORITY_ATTAINMENT_GOAL,
            "zero_lost": recon["lost_client"] == 0 and recon["lost_ledger"] == 0,
            "cycle_p99<=50ms": cycles["p99_ms"] is not None
            and cycles["p99_ms"] <= CYCLE_P99_GOAL_MS},
        "config": config,
        "files": dict(serve.get("files", {})),
    }
    if plot:
        report["files"]["timeline"] = str(plot_timeline(replay, events, tiers,
                                                         out_dir / "chaos_timeline.png"))
    report["files"]["chaos"] = str(out_dir / "chaos.json")
    (out_dir / "chaos.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
