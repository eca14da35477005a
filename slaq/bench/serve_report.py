"""The report of a ``slaq bench serve`` run: per tier and overall, JSON and PNG plots.

Counts: ``sent`` = ``finished`` + ``refused`` (HTTP 429) + ``lost`` (any other error, a timeout,
or a stream without ``[DONE]``); ``downgraded`` counts finished requests whose response
``service_tier`` differs from the tier asked. Requests are grouped by the tier asked and judged
against the targets of the tier the response says was used (the SLA the server took on).

SLA attainment is over every request *sent* in the tier (a refused or lost request misses);
``attainment_of_finished`` is the same over finished ones. Goodput (DistServe) = requests
meeting every SLO of their tier (TTFT and TPOT) per second of the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from slaq.bench.serve import FINISHED, LOST, REFUSED, ReplayResult, RequestResult
from slaq.platform.tiers import TIER_NAMES, TierTable


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) with linear interpolation, as numpy's default; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values_s: Iterable[float | None]) -> dict[str, float | None]:
    """Mean, median and p99 in milliseconds of the non-None values."""
    xs = [v * 1000.0 for v in values_s if v is not None]
    return {"mean": sum(xs) / len(xs) if xs else None, "p50": percentile(xs, 50),
            "p99": percentile(xs, 99), "count": len(xs)}


def meets_sla(res: RequestResult, tiers: TierTable) -> bool:
    """Finished, and TTFT and TPOT within the targets of the tier that served it."""
    if res.outcome != FINISHED:
        return False
    tier = res.tier_used if res.tier_used in TIER_NAMES else res.tier_asked
    target = tiers[tier]
    ttft_ms = None if res.ttft_s is None else res.ttft_s * 1000.0
    tpot = res.tpot_s
    return target.meets(ttft_ms, None if tpot is None else tpot * 1000.0)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarise_group(results: Sequence[RequestResult], tiers: TierTable,
                    duration_s: float) -> dict[str, Any]:
    """Counts, attainment, latency statistics and throughput of one group of requests."""
    done = [r for r in results if r.outcome == FINISHED]
    good = [r for r in done if meets_sla(r, tiers)]

    def target_ok(r: RequestResult, which: str) -> bool:
        t = tiers[r.tier_used if r.tier_used in TIER_NAMES else r.tier_asked]
        if which == "ttft":
            return r.ttft_s is not None and r.ttft_s * 1000.0 <= t.ttft_ms
        return r.tpot_s is None or r.tpot_s * 1000.0 <= t.tpot_ms

    ttft_ok = sum(target_ok(r, "ttft") for r in done)
    tpot_ok = sum(target_ok(r, "tpot") for r in done)
    sent = len(results)

    def per_s(n: float) -> float | None:
        return n / duration_s if duration_s > 0 else None

    out_tokens = sum(r.num_output_tokens for r in done)
    return {
        "sent": sent, "finished": len(done),
        "refused": sum(r.outcome == REFUSED for r in results),
        "lost": sum(r.outcome == LOST for r in results),
        "downgraded": sum(r.downgraded for r in done),
        "met_sla": len(good),
        "sla_attainment": _ratio(len(good), sent),
        "ttft_attainment": _ratio(ttft_ok, sent),
        "tpot_attainment": _ratio(tpot_ok, sent),
        "attainment_of_finished": _ratio(len(good), len(done)),
        "ttft_ms": stats_ms(r.ttft_s for r in done),
        "tpot_ms": stats_ms(r.tpot_s for r in done),
        "itl_ms": stats_ms(x for r in done for x in r.itl_s),
        "e2e_ms": stats_ms(r.e2e_s for r in done),
        "request_throughput": per_s(len(done)),
        "output_token_throughput": per_s(out_tokens),
        "goodput": per_s(len(good)),
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.num_prompt_tokens for r in done),
        "cached_prompt_tokens": sum(r.num_cached_tokens for r in done),
    }


def attainment_over_time(results: Sequence[RequestResult], tiers: TierTable, duration_s: float,
                         num_windows: int = 20) -> dict[str, Any]:
    """SLA attainment per tier in equal windows of send (else arrival) time; None where a
    window has no request of that tier."""
    window_s = max(duration_s, 1e-9) / num_windows
    starts = [i * window_s for i in range(num_windows)]
    series: dict[str, list[float | None]] = {}
    for tier in TIER_NAMES:
        sent = [0] * num_windows
        good = [0] * num_windows
        for r in results:
            if r.tier_asked != tier:
                continue
            t = r.sent_s if r.sent_s is not None else r.arrival_s
            k = min(int(t / window_s), num_windows - 1)
            sent[k] += 1
            good[k] += meets_sla(r, tiers)
        if any(sent):
            series[tier] = [_ratio(g, s) for g, s in zip(good, sent, strict=True)]
    return {"window_s": window_s, "t_s": starts, "tiers": series}


def build_report(replay: ReplayResult, tiers: TierTable | None = None, *,
                 label: str | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report as a JSON-ready dict: overall, per tier (asked), over time."""
    tiers = tiers or TierTable()
    res = replay.results
    per_tier = {}
    for tier in TIER_NAMES:
        group = [r for r in res if r.tier_asked == tier]
        if group:
            t = tiers[tier]
            per_tier[tier] = {"targets": {"ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms},
                              **summarise_group(group, tiers, replay.duration_s)}
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in res:
        if r.error:
            key = r.error.split(":")[0][:60]
            errors[key] = errors.get(key, 0) + 1
            examples.setdefault(key, r.error[:300])
    return {
        "label": label, "model": replay.model, "started_at": replay.started_at,
        "duration_s": replay.duration_s, **(meta or {}),
        "overall": summarise_group(res, tiers, replay.duration_s),
        "tiers": per_tier,
        "attainment_over_time": attainment_over_time(res, tiers, replay.duration_s),
        "errors": errors, "error_examples": examples,
    }


def write_results(replay: ReplayResult, path: str | Path) -> Path:
    """Every request's record as JSON lines (first line: the run), to recompute reports."""
    path = Path(path)
    with path.open("w") as f:
        f.write(json.dumps({"model": replay.model, "started_at": replay.started_at,
                            "duration_s": replay.duration_s}) + "\n")
        for r in replay.results:
            f.write(json.dumps(r.to_dict()) + "\n")
    return path


def load_results(path: str | Path) -> ReplayResult:
    """Read what :func:`write_results` wrote."""
    lines = Path(path).read_text().splitlines()
    head = json.loads(lines[0])
    results = [RequestResult.from_dict(json.loads(line)) for line in lines[1:] if line.strip()]
    return ReplayResult(head["model"], head["started_at"], head["duration_s"], results)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(replay: ReplayResult, tiers: TierTable, path: str | Path,
                  title: str = "") -> Path:
    """Empirical CDF of TTFT per tier asked, with each tier's target as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, tier in enumerate(TIER_NAMES):
        xs = sorted(r.ttft_s * 1000.0 for r in replay.results
                    if r.tier_asked == tier and r.outcome == FINISHED and r.ttft_s is not None)
        if not xs:
            continue
        ys = [(k + 1) / len(xs) for k in range(len(xs))]
        color = f"C{i}"
        ax.step(xs, ys, where="post", color=color, label=f"{tier} (n={len(xs)})")
        ax.axvline(tiers[tier].ttft_ms, color=color, linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log); dashed: tier target")
    ax.set_ylabel("fraction of finished requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "TTFT CDF per tier")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_attainment(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """SLA attainment per tier over the run (windows of send time)."""
    plt = _pyplot()
    series = report["attainment_over_time"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, tier in enumerate(TIER_NAMES):
        ys = series["tiers"].get(tier)
        if ys is None:
            continue
        pts = [(t, y) for t, y in zip(series["t_s"], ys, strict=True) if y is not None]
        ax.plot([t for t, _ in pts], [y * 100 for _, y in pts], marker="o", markersize=3,
                color=f"C{i}", label=tier)
    ax.set_xlabel(f"time since start (s), windows of {series['window_s']:.1f} s")
    ax.set_ylabel("SLA attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or "SLA attainment over time")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(replay: ReplayResult, out_dir: str | Path, *, tiers: TierTable | None = None,
                 label: str | None = None, meta: dict[str, Any] | None = None,
                 plot: bool = True) -> dict[str, Any]:
    """Write ``report.json``, ``requests.jsonl`` and (with ``plot``) the PNGs into ``out_dir``."""
    tiers = tiers or TierTable()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(replay, tiers, label=label, meta=meta)
    report["files"] = {"requests": str(write_results(replay, out / "requests.jsonl"))}
    if plot:
        name = f" ({label})" if label else ""
        report["files"]["ttft_cdf"] = str(plot_ttft_cdf(replay, tiers, out / "ttft_cdf.png",
                                                        f"TTFT CDF per tier{name}"))
        report["files"]["attainment"] = str(plot_attainment(
            report, out / "attainment_over_time.png", f"SLA attainment over time{name}"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table, one row per tier plus ``all``."""
    head = ("| tier | sent | finished | refused | downgraded | lost | SLA att. | "
            "TTFT p50/p99 ms | TPOT p50/p99 ms | goodput req/s |")
    rows = [head, "|" + "---|" * 10]

    def fmt(x: float | None, pct: bool = False) -> str:
        if x is None:
            return "–"
        return f"{x * 100:.1f}%" if pct else f"{x:.0f}" if x >= 100 else f"{x:.2f}"

    groups = [*report["tiers"].items(), ("all", report["overall"])]
    for name, g in groups:
        rows.append(f"| {name} | {g['sent']} | {g['finished']} | {g['refused']} | "
                    f"{g['downgraded']} | {g['lost']} | {fmt(g['sla_attainment'], True)} | "
                    f"{fmt(g['ttft_ms']['p50'])}/{fmt(g['ttft_ms']['p99'])} | "
                    f"{fmt(g['tpot_ms']['p50'])}/{fmt(g['tpot_ms']['p99'])} | "
                    f"{fmt(g['goodput'])} |")
    return "\n".join(rows)


def format_comparison(reports: Sequence[dict[str, Any]]) -> str:
    """One Markdown table over several runs of the same trace (one per policy): per tier and
    overall, attainment, latencies and goodput, with goodput relative to the first run."""
    rows = ["| policy | tier | sent | refused | downgraded | lost | SLA att. | TTFT att. | "
            "TTFT p50/p99 ms | TPOT p50/p99 ms | goodput req/s | goodput vs first |",
            "|" + "---|" * 12]
    base = reports[0]["overall"]["goodput"] if reports else None

    def num(x: float | None, pct: bool = False) -> str:
        if x is None:
            return "–"
        return f"{x * 100:.1f}%" if pct else f"{x:.0f}" if x >= 100 else f"{x:.2f}"

    for i, rep in enumerate(reports):
        label = rep.get("label") or f"run {i}"
        for tier, g in [*rep["tiers"].items(), ("all", rep["overall"])]:
            rel = (f"{g['goodput'] / base:.2f}x" if tier == "all" and base and
                   g["goodput"] is not None else "")
            rows.append(f"| {label} | {tier} | {g['sent']} | {g['refused']} | "
                        f"{g['downgraded']} | {g['lost']} | "
                        f"{num(g['sla_attainment'], True)} | {num(g['ttft_attainment'], True)} | "
                        f"{num(g['ttft_ms']['p50'])}/{num(g['ttft_ms']['p99'])} | "
                        f"{num(g['tpot_ms']['p50'])}/{num(g['tpot_ms']['p99'])} | "
                        f"{num(g['goodput'])} | {rel} |")
    return "\n".join(rows)


# ---- several policies, one trace (``slaq bench serve --launch``) --------------------------

SUMMARY_KEYS = ("sent", "finished", "refused", "downgraded", "lost", "met_sla",
                "sla_attainment", "ttft_attainment", "tpot_attainment",
                "attainment_of_finished", "goodput", "request_throughput",
                "output_token_throughput")


def group_summary(g: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one group (a tier or ``overall``) of a serve report."""
    return {k: g[k] for k in SUMMARY_KEYS} | {
        name: {q: g[name][q] for q in ("p50", "p99")}
        for name in ("ttft_ms", "tpot_ms", "e2e_ms")}


def run_summary(report: dict[str, Any]) -> dict[str, Any]:
    """One run of a comparison: per tier and overall, plus whatever the runner added."""
    out = {"duration_s": report["duration_s"],
           "tiers": {t: group_summary(g) for t, g in report["tiers"].items()},
           "overall": group_summary(report["overall"])}
    for key in ("reconciliation", "still_active_in_ledger", "decisions", "stack", "files"):
        if key in report:
            out[key] = report[key]
    if "reconciliation" in out:  # the examples stay in the run's own report.json
        out["reconciliation"] = {k: v for k, v in out["reconciliation"].items()
                                 if not k.endswith("_examples")}
    return out


def plot_policy_comparison(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per tier (and all), each run's SLA attainment (left) and goodput (right)."""
    plt = _pyplot()
    groups = [*TIER_NAMES, "all"]
    fig, (ax_att, ax_good) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(reports))
    for i, rep in enumerate(reports):
        label = rep.get("label") or f"run {i}"
        att, good = [], []
        for name in groups:
            g = rep["overall"] if name == "all" else rep["tiers"].get(name)
            att.append(100 * (g["sla_attainment"] or 0) if g else 0)
            good.append((g["goodput"] or 0) if g else 0)
        xs = [k + (i - (len(reports) - 1) / 2) * width for k in range(len(groups))]
        ax_att.bar(xs, att, width, label=label, color=f"C{i}")
        ax_good.bar(xs, good, width, label=label, color=f"C{i}")
    for ax, ylabel in ((ax_att, "SLA attainment (% of sent)"), (ax_good, "goodput (req/s)")):
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    ax_att.set_ylim(0, 118)
    ax_att.legend(loc="upper center", fontsize=8, ncol=len(reports))
    ax_att.set_title("SLA attainment per tier asked")
    ax_good.set_title("goodput (requests meeting TTFT and TPOT per s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_policy_ttft_cdf(results: dict[str, ReplayResult], tiers: TierTable,
                         path: str | Path) -> Path:
    """One panel per tier: each run's TTFT CDF over finished requests; dashed: the target."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TIER_NAMES), figsize=(4 * len(TIER_NAMES), 4),
                             sharey=True)
    for ax, tier in zip(axes, TIER_NAMES, strict=True):
        for i, (label, replay) in enumerate(results.items()):
            xs = sorted(r.ttft_s * 1000.0 for r in replay.results if r.tier_asked == tier
                        and r.outcome == FINISHED and r.ttft_s is not None)
            sent = sum(r.tier_asked == tier for r in replay.results)
            if not xs:
                continue
            # Over every request sent: refused and lost ones never reach the top.
            ys = [(k + 1) / sent for k in range(len(xs))]
            ax.step(xs, ys, where="post", color=f"C{i}", label=label)
        ax.axvline(tiers[tier].ttft_ms, color="k", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{tier} (target {tiers[tier].ttft_ms / 1000:g} s)")
        ax.set_xlabel("TTFT (ms, log)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("fraction of sent requests")
    axes[0].set_ylim(0, 1.02)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
