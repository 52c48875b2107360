"""``docs/benchmarks.md`` and ``docs/benchmarks.png`` from the scenarios' results."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.scenarios import LABELS, Scenario

GB = 1e9
CAT_NAMES = {
    "jvm": "JVM",
    "spark_py": "Spark Python workers",
    "ray_actors": "Ray actors",
    "ray_system": "Ray system",
    "inproc": "the process",
}


SHORT = {"jvm": "JVM", "spark_py": "workers", "ray_actors": "actors", "ray_system": "Ray", "inproc": "proc"}


def _fmt_rate(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:,.0f}"


def _ratio(x: float, y: float) -> str:
    return "n/a" if not (math.isfinite(x) and math.isfinite(y) and y) else f"{x / y:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def throughput_table(sc: Scenario) -> list[str]:
    r = sc.results
    d = r.get("d")
    e = r.get("e")
    rows = []
    for key, res in r.items():
        peak, at = res.peak()
        breakdown = ", ".join(f"{CAT_NAMES[c]} {v / GB:.2f}" for c, v in at.items() if v)
        if res.extra_bytes:
            breakdown += f", {res.extra_label} {res.extra_bytes / GB:.2f}"
        mem_d = d.peak()[0] if d else 0
        cpu, split = res.cpu_per_row()
        cpu_txt = "n/a" if not math.isfinite(cpu) else f"{cpu * 1e5:.1f}"
        if split and len([v for v in split.values() if v > 0]) > 1:
            cpu_txt += " (" + ", ".join(
                f"{SHORT[c]} {v * 1e5:.1f}" for c, v in split.items() if v * 1e5 >= 0.05
            ) + ")"
        ok = "n/a (no-op)" if not res.predicts else ("yes" if res.checksum_ok else "**NO**")
        rows.append([
            res.label,
            _fmt_rate(res.median_rate),
            " / ".join(_fmt_rate(x) for x in res.rates),
            f"{res.spread:.0%}",
            _ratio(res.median_rate, d.median_rate) if d else "",
            _ratio(res.median_rate, e.median_rate) if e else "",
            cpu_txt,
            f"{peak / GB:.2f}",
            _ratio(peak, mem_d) if mem_d else "",
            breakdown,
            ok,
        ])
    return _table(
        ["contender", "median rows/s", "runs (rows/s)", "spread", "vs (d)", "vs (e)",
         "CPU s per 100k rows", "peak memory (GB)", "memory vs (d)", "at the peak (GB)", "checksum = (a)"],
        rows,
    )


def targets_table(scenarios: Sequence[Scenario]) -> list[str]:
    rows = []
    for sc in scenarios:
        for t in sc.targets:
            status = "n/a" if t.met is None else ("**met**" if t.met else "**missed**")
            rows.append([t.name, t.goal, t.measured, status, t.margin(), t.why])
    return _table(["target", "goal", "measured", "status", "by how much", "why (when missed)"], rows)


def write_markdown(
    path: Path,
    scenarios: dict[str, Scenario],
    *,
    profile: dict[str, Any] | None,
    cfg: Any,
    elapsed_s: float,
    versions: dict[str, str],
    why: dict[str, str],
    plan: list[str],
    dominates: list[str],
    load_at_start: float | None = None,
    chart: str | None = "benchmarks.png",
) -> None:
    only_s6 = set(scenarios) == {"S6"}  # make bench-real: S1's profile and plan do not apply
    if load_at_start is not None and load_at_start < 0.5:
        caveat = (
            f"> **Machine.** No other job ran when this run started (1-minute load average "
            f"{load_at_start:.2f}); the spread column shows the run-to-run noise that remains on 2 "
            "cores shared by the JVM, the Python workers and Ray."
        )
    else:
        load = f" (1-minute load average {load_at_start:.2f} at the start)" if load_at_start is not None else ""
        caveat = (
            f"> **Caveat.** These numbers were measured on a shared 2-core machine while other jobs "
            f"were running on it{load}; the spread column shows how noisy each contender was. "
            "Re-measure on a quiet machine before quoting them."
        )
    lines = [
        "# Benchmarks: spark-ray-udf against the alternatives",
        "",
        ("Written by `make bench-real` (`benchmarks/run.py --only S6`" if only_s6
         else "Written by `make bench` (`benchmarks/run.py`")
        + (", **`--quick`: small sizes, 1 round — a smoke test, not a measurement**" if cfg.quick else "")
        + f"). This run: {elapsed_s / 60:.1f} min on {platform.machine()} with "
        f"{__import__('os').cpu_count()} cores, no GPU; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".",
        "",
        caveat,
        "",
        "How to read: every scenario runs every contender on the same rows, with the same Spark "
        "configuration and cores, in one process tree; one warm-up pass per contender, then "
        "rounds in rotating order, median rows/s reported. Peak memory is the largest sum, over "
        "samples taken every 0.25 s in a background thread, of the private memory (USS, psutil) "
        "of the processes the contender uses: the Spark JVM and Python workers, plus Ray's actors "
        "and system processes for (e) and (e2); the single process for (a). The driver process is not "
        "counted. CPU seconds per 100k rows (user + system, summed over the same processes, "
        "measured passes only) are less sensitive to a busy machine than wall time: they show the "
        "work each contender does, split by process kind. The Ray object store is shared memory (not in any USS) and is added where the "
        "library pins the model there. Every predicting contender's checksum (`sum(id * prediction)`, "
        "which depends on which prediction lands on which row) is compared with (a)'s.",
        "",
        "Contenders: " + "; ".join(f"{v}" for v in LABELS.values()) + ".",
        "",
        ("The S1-S5 report of `make bench` is [benchmarks.md](benchmarks.md); the GPU run "
         "(`make bench-gpu`) is in [benchmarks-gpu.md](benchmarks-gpu.md)." if only_s6 else
         "Elsewhere: S6, a real transformer model (`make bench-real`), in "
         "[benchmarks-real.md](benchmarks-real.md); the GPU run (`make bench-gpu`) in "
         "[benchmarks-gpu.md](benchmarks-gpu.md)."),
        "",
        "## Targets",
        "",
        *targets_table(list(scenarios.values())),
        "",
    ]
    for key, sc in scenarios.items():
        lines += [f"## {key}. {sc.title}", ""]
        lines += [f"- {s}" for s in sc.setup]
        lines.append("")
        if sc.key in ("S1", "S2", "S6"):
            lines += throughput_table(sc)
            lines.append("")
        for title, header, rows in sc.tables:
            lines += [f"**{title}**", "", *_table(header, rows), ""]
        for n in sc.notes:
            lines += [n, ""]
        for r in sc.results.values():
            for n in r.notes:
                lines += [f"- {r.label}: {n}"]
        if any(r.notes for r in sc.results.values()):
            lines.append("")
        if key in why:
            lines += [why[key], ""]
    if "failures" in why:
        lines += ["## Failures", "", why["failures"], ""]
    if not only_s6:
        lines += ["## Profile of the spark-ray-udf hot path (S1)", ""]
        lines += dominates + [""]
    if profile and not only_s6:
        lines += [
            "<details><summary>Actor profile (sampling, main thread of the actor)</summary>",
            "",
            "```",
            *_trim(profile.get("actor", ""), 90),
            "```",
            "",
            "</details>",
            "",
            "<details><summary>Spark Python worker profile (Spark's UDF profiler, cProfile)</summary>",
            "",
            "```",
            *_trim(profile.get("worker", ""), 70),
            "```",
            "",
            "</details>",
            "",
        ]
    if not only_s6:
        lines += ["## Plan past this machine", "", *plan, ""]
    if chart:
        lines += [f"![benchmarks]({chart})", ""]
    path.write_text("\n".join(lines))


def _trim(text: str, n: int) -> list[str]:
    out = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    return out[:n] + (["..."] if len(out) > n else [])


def _short(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def write_chart(path: Path, scenarios: dict[str, Scenario]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = {"a": "#777777", "b": "#bbbbbb", "bp": "#dddddd", "c": "#8fb3d9", "d": "#e69f00", "e": "#009e73", "e2": "#66c2a5"}

    def bars(ax: Any, keys: list[str], values: list[float], title: str, ylabel: str) -> None:
        ax.bar(range(len(keys)), values, color=[colors.get(k, "#999999") for k in keys])
        ax.set_xticks(range(len(keys)), [f"({k})" if k != "bp" else "(b')" for k in keys])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        for i, v in enumerate(values):
            if math.isfinite(v):
                ax.annotate(_short(v), (i, v), ha="center", va="bottom", fontsize=8)
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            ax.set_ylim(0, max(finite) * 1.12)

    s1 = scenarios.get("S1")
    ax = axes[0][0]
    if s1:
        keys = list(s1.results)
        bars(ax, keys, [s1.results[k].median_rate for k in keys], "S1 MLP: median rows/s (higher is better)", "rows/s")
        if "bound" in s1.data:
            ax.axhline(s1.data["bound"], ls="--", color="k", lw=1)
            ax.annotate("bound 1/(1/a+1/b)", (0, s1.data["bound"]), fontsize=8, va="bottom")
    s2 = scenarios.get("S2")
    if s2:
        keys = list(s2.results)
        ax = axes[0][1]
        bottoms = [0.0] * len(keys)
        for cat, color in (("jvm", "#cccccc"), ("spark_py", "#e69f00"), ("ray_actors", "#009e73"),
                           ("ray_system", "#56b4e9"), ("inproc", "#777777")):
            vals = [s2.results[k].peak()[1].get(cat, 0) / GB for k in keys]
            ax.bar(range(len(keys)), vals, bottom=bottoms, color=color, label=CAT_NAMES[cat])
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        extra = [s2.results[k].extra_bytes / GB for k in keys]
        ax.bar(range(len(keys)), extra, bottom=bottoms, color="#cc79a7", label="Ray object store")
        totals = [b + x for b, x in zip(bottoms, extra)]
        for i, v in enumerate(totals):
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(totals) * 1.12)
        ax.set_xticks(range(len(keys)), [f"({k})" for k in keys])
        ax.set_title("S2 1 GB model, 4 tasks: peak memory (GB, lower is better)", fontsize=10)
        ax.legend(fontsize=7)
        bars(axes[0][2], keys, [s2.results[k].median_rate for k in keys], "S2: median rows/s", "rows/s")
    s3 = scenarios.get("S3")
    if s3 and "latency" in s3.data:
        keys = list(s3.data["latency"])
        bars(axes[1][0], keys, [s3.data["latency"][k] for k in keys],
             "S3 streaming, idle workers killed: s per micro-batch (lower is better)", "seconds")
    s4 = scenarios.get("S4")
    if s4 and s4.data:
        d = s4.data
        names = ["register\n(new pool)", "re-register\nversion=None", "re-register\npinned",
                 "1st pred.\n(e)", "1st pred.\n(d)", "1st call\n(b)"]
        vals = [d["register_s"], d["reregister_s"], d["reregister_pinned_s"], d["e_first_s"],
                d["d_first_s"], d["b_first_s"]]
        ax = axes[1][1]
        ax.bar(range(len(vals)), vals,
               color=["#009e73", "#009e73", "#009e73", "#009e73", "#e69f00", "#bbbbbb"])
        ax.set_xticks(range(len(vals)), names, fontsize=8)
        ax.set_title("S4 cold start (s)", fontsize=10)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3f}" if v < 0.1 else f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(vals) * 1.12)
    s5 = scenarios.get("S5")
    if s5 and "med" in s5.data:
        m = s5.data["med"]
        names = ["spark-ray-udf\nround trip", "actor-side\nwork", "raw Ray\n(numpy)", "ray.put", "memcpy", "ping"]
        vals = [m["lib"], m["local"], m["raw"], m["put"], m["memcpy"], m["ping"]]
        ax = axes[1][2]
        ax.bar(range(len(vals)), vals, color="#56b4e9")
        floor = s5.data.get("floor_ms", 2 * m["memcpy"] + m["local"])
        ax.axhline(floor, ls="--", color="k", lw=1)
        ax.set_xticks(range(len(vals)), names, fontsize=8)
        ax.set_title("S5 one 31 MB batch (ms; dashed: 2x memcpy + actor work)", fontsize=10)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
    for row in axes:
        for ax in row:
            ax.tick_params(labelsize=8)
    fig.suptitle("spark-ray-udf benchmarks (2 cores, no GPU; see docs/benchmarks.md)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
