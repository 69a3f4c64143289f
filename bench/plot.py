#!/usr/bin/env python3
"""Plots and a Markdown summary from the Google Benchmark JSON files in a results directory.

usage: plot.py RESULTS_DIR    (reads RESULTS_DIR/bench_*.json, writes *.png, summary.md and overview.md there)

Benchmark names look like BM_Fused/n:4096/d:64/causal:0/threads:1/real_time: the BM_ part is the variant and the
key:value parts are parameters. Each binary is one family (bench_sdpa -> sdpa).
"""
import glob
import json
import math
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(results):
    rows, context = [], {}
    for path in sorted(glob.glob(os.path.join(results, "bench_*.json"))):
        family = os.path.basename(path)[len("bench_"):-len(".json")]
        with open(path) as f:
            data = json.load(f)
        context = data.get("context", context)
        for b in data.get("benchmarks", []):
            if b.get("run_type") == "aggregate" or b.get("error_occurred"):
                continue
            parts = b["run_name"].split("/")
            params = dict(p.split(":", 1) for p in parts[1:] if ":" in p and not p.startswith("min_time:"))
            for named in ("pattern", "map", "kind", "norm"):  # the name instead of its number
                if b.get("label") and named in params:
                    params[named] = b["label"]
            scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
            rows.append({
                "family": family, "variant": parts[0].removeprefix("BM_"), "params": params,
                "ms": b["real_time"] * scale, "gflops": b.get("GFLOPs"), "pct_peak": b.get("pct_peak"),
                "pct_peak_best": b.get("pct_peak_best"),
                "heap_mib": b.get("heap_MiB"), "workspace_mib": b.get("workspace_MiB"), "kv_gbps": b.get("KV_GBps"),
                "pct_read_bw": b.get("pct_read_bw"), "kept_mib": b.get("kept_MiB"), "max_err": b.get("max_err"),
                "step_gbps": b.get("step_GBps"), "pct_step_read_bw": b.get("pct_step_read_bw"),
                "best_ms": b.get("best_ms"), "floor_growth": b.get("floor_growth"), "ns_per_row": b.get("ns_per_row"),
            })
    return rows, context


def series(rows, key):
    """Groups rows by every parameter but `key`, sorted along `key`."""
    groups = defaultdict(list)
    for r in rows:
        if key not in r["params"]:
            continue
        rest = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()) if k != key)
        groups[(r["family"], r["variant"], rest)].append(r)
    return {g: sorted(v, key=lambda r: int(r["params"][key])) for g, v in groups.items()}


def draw(ax, groups, metric, ylabel, title, logy, with_family):
    """One panel: a line per series along n, causal dashed, d = 128 with square markers, legend beside it."""
    colors = plt.cm.tab20.colors
    for index, ((family, variant, rest), v) in enumerate(sorted(groups.items())):
        style = "--" if "causal=1" in rest else "-"
        marker = "s" if "d=128" in rest else "o"
        label = f"{family} {variant} ({rest})" if with_family else f"{variant} ({rest})"
        ax.plot([int(r["params"]["n"]) for r in v], [r[metric] for r in v], style, marker=marker, markersize=3,
                color=colors[index % len(colors)], label=label)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot(rows, results, metric, ylabel, filename, title, only=None, logy=True, per_family=False):
    """A figure of `metric` against n: one panel per family (per_family), or one panel for the selected series."""
    groups = {g: v for g, v in series(rows, "n").items() if only is None or only(g)}
    groups = {g: v for g, v in groups.items() if all(r[metric] is not None for r in v)}
    if not groups:
        return None
    families = sorted({g[0] for g in groups}) if per_family else [None]
    cols = 2 if len(families) > 1 else 1
    panel_rows = (len(families) + cols - 1) // cols
    fig, axes = plt.subplots(panel_rows, cols, figsize=(11 * cols, 5 * panel_rows), squeeze=False)
    for ax, family in zip(axes.flat, families):
        subset = {g: v for g, v in groups.items() if family is None or g[0] == family}
        draw(ax, subset, metric, ylabel, f"{title}: {family}" if family else title, logy, family is None)
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = os.path.join(results, filename)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def fmt(x, digits=1):
    return "" if x is None else f"{x:.{digits}f}"


def sci(x):
    return "" if x is None else f"{x:.1e}"


def growth(runs, small, large):
    """time(large) / time(small) of a series keyed by n: of the best calls (best_ms) when the benchmark reports them,
    with the ratio of the means beside it; "" when either size is missing."""
    if small not in runs or large not in runs:
        return ""
    a, b = runs[small], runs[large]
    mean = b["ms"] / a["ms"]
    if a.get("best_ms") and b.get("best_ms"):
        return f"{b['best_ms'] / a['best_ms']:.1f} (means {mean:.1f})"
    return f"{mean:.1f}"


def floor_at(rows, family, runs, small=4096):
    """The memory's floor under a growth figure (BM_StreamFloor, bench_util.hpp): its floor_growth at the pace of a
    series' fastest call at n = small (ns per row), interpolated in log pace between the work levels around it, per
    panel size; "low-high" over the panels, "" without floor rows or a best call."""
    if small not in runs or not runs[small].get("best_ms"):
        return ""
    pace = runs[small]["best_ms"] * 1e6 / small
    panels = defaultdict(list)
    for r in rows:
        if r["family"] == family and r["variant"] == "StreamFloor" and r["floor_growth"] and r["ns_per_row"]:
            panels[r["params"]["panel"]].append((r["ns_per_row"], r["floor_growth"]))
    values = []
    for points in panels.values():
        points.sort()
        if pace <= points[0][0]:
            values.append(points[0][1])
        elif pace >= points[-1][0]:
            values.append(points[-1][1])
        else:
            for (p0, g0), (p1, g1) in zip(points, points[1:]):
                if p0 <= pace <= p1:
                    t = (math.log(pace) - math.log(p0)) / (math.log(p1) - math.log(p0)) if p1 > p0 else 0.0
                    values.append(g0 + t * (g1 - g0))
                    break
    if not values:
        return ""
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


FLOOR_NOTE = ("Floor: the growth of a plain pass that reads three rows and writes one per query row at the kernel's "
              "own pace (time per row at n = 4096, fastest call) with a cache-resident working set of 16 or 256 KiB "
              "(BM_StreamFloor in bench_util.hpp), measured in the same run: what the memory adds at that pace to a "
              "kernel that reads its inputs and writes its output once, however well it prefetches.")


def sparse_section(rows):
    """Per sparse pattern: time, GFLOP/s on the allowed pairs, and both as ratios to dense attention at the same n."""
    dense = {int(r["params"]["n"]): r for r in rows
             if r["family"] == "sparse" and r["variant"] == "Dense" and r["params"].get("threads") == "1"}
    sparse = [r for r in rows if r["family"] == "sparse" and r["variant"] == "Sparse" and r["params"].get("threads") == "1"]
    if not sparse or not dense:
        return []
    lines = ["", "## Sparse patterns vs dense attention (d = 64, one thread)", "",
             "GFLOP/s count 4 d FLOPs per allowed pair. Speed-up = dense time / sparse time at the same n.", "",
             "| pattern | n | time (ms) | GFLOP/s | GFLOP/s vs dense | speed-up |", "|---|---:|---:|---:|---:|---:|"]
    by_pattern = defaultdict(dict)
    for r in sparse:
        by_pattern[r["params"]["pattern"]][int(r["params"]["n"])] = r
    for pattern, runs in by_pattern.items():
        for n in sorted(runs):
            r, d = runs[n], dense.get(n)
            ratio = f"{r['gflops'] / d['gflops']:.2f}" if d and r["gflops"] and d["gflops"] else ""
            speedup = f"{d['ms'] / r['ms']:.1f}x" if d else ""
            lines.append(f"| {pattern} | {n} | {r['ms']:.3f} | {fmt(r['gflops'])} | {ratio} | {speedup} |")
    grown = [(pattern, runs) for pattern, runs in by_pattern.items() if 4096 in runs and 65536 in runs]
    if grown:
        lines += ["", FLOOR_NOTE, "", "| pattern | time(65536) / time(4096), best calls (linear = 16) | "
                  "floor at its pace |", "|---|---:|---:|"]
        lines += [f"| {pattern} | {growth(runs, 4096, 65536)} | {floor_at(rows, 'sparse', runs)} |"
                  for pattern, runs in grown]
    return lines


def linear_section(rows):
    """Per linear-attention map and form: time, speed-up over exact attention, and the crossover length."""
    exact = {(r["params"]["causal"], int(r["params"]["n"])): r for r in rows
             if r["family"] == "linear" and r["variant"] == "Exact"}
    linear = [r for r in rows if r["family"] == "linear" and r["variant"] == "Linear"]
    if not linear or not exact:
        return []
    lines = ["", "## Linear attention vs exact attention (d = 64, one thread)", "",
             "| map | causal | n | time (ms) | exact (ms) | speed-up | peak heap (MiB) |", "|---|---|---:|---:|---:|---:|---:|"]
    groups = defaultdict(dict)
    for r in linear:
        groups[(r["params"]["map"], r["params"]["causal"])][int(r["params"]["n"])] = r
    crossover = []
    for (name, causal), runs in sorted(groups.items()):
        first = None
        for n in sorted(runs):
            r, e = runs[n], exact.get((causal, n))
            if e and first is None and r["ms"] < e["ms"]:
                first = n
            lines.append(f"| {name} | {causal} | {n} | {r['ms']:.3f} | {e['ms']:.3f} | {e['ms'] / r['ms']:.1f}x | "
                         f"{fmt(r['heap_mib'], 2)} |" if e else f"| {name} | {causal} | {n} | {r['ms']:.3f} | | | |")
        crossover.append(f"| {name} | {causal} | {first if first else 'not reached'} | {growth(runs, 4096, 65536)} | "
                         f"{floor_at(rows, 'linear', runs)} |")
    lines += ["", FLOOR_NOTE, "",
              "| map | causal | faster than exact from n = | time(65536) / time(4096), best calls (linear = 16) | "
              "floor at its pace |", "|---|---|---:|---:|---:|"] + crossover
    steps = [r for r in rows if r["family"] == "linear" and r["variant"] == "RecurrentStep"]
    if steps:
        lines += ["", "| recurrent decode step | after length | time (us) |", "|---|---:|---:|"]
        for r in sorted(steps, key=lambda r: (r["params"]["map"], int(r["params"]["length"]))):
            lines.append(f"| {r['params']['map']} | {r['params']['length']} | {r['ms'] * 1e3:.2f} |")
    return lines


def synthesizer_section(rows):
    """Per synthesizer variant, causal or not, and n: time and speed-up over MHA of the same width and heads."""
    mha = {(r["params"]["causal"], int(r["params"]["n"])): r for r in rows
           if r["family"] == "synthesizer" and r["variant"] == "Mha"}
    synth = [r for r in rows if r["family"] == "synthesizer" and r["variant"] == "Synthesizer"]
    if not synth or not mha:
        return []
    lines = ["", "## Synthesizer vs multi-head attention (d = 512, H = 8, l = 4096, one thread)", "",
             "| variant | causal | n | time (ms) | MHA (ms) | speed-up over MHA | peak heap (MiB) | kept (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    slowest = defaultdict(lambda: float("inf"))
    for r in sorted(synth, key=lambda r: (r["params"]["kind"], r["params"]["causal"], int(r["params"]["n"]))):
        key = (r["params"]["causal"], int(r["params"]["n"]))
        m = mha.get(key)
        if not m:
            continue
        ratio = m["ms"] / r["ms"]
        slowest[(r["params"]["kind"], r["params"]["causal"])] = min(slowest[(r["params"]["kind"], r["params"]["causal"])], ratio)
        lines.append(f"| {r['params']['kind']} | {key[0]} | {key[1]} | {r['ms']:.3f} | {m['ms']:.3f} | {ratio:.2f}x | "
                     f"{fmt(r['heap_mib'], 2)} | {fmt(r['kept_mib'], 1)} |")
    lines += ["", "| variant | causal | smallest speed-up over MHA across n |", "|---|---|---:|"]
    lines += [f"| {kind} | {causal} | {ratio:.2f}x |" for (kind, causal), ratio in sorted(slowest.items())]
    return lines


def gau_section(rows):
    """GAU and FLASH against MHA + FFN of the same parameter count: times, FLASH's growth and speed-up."""
    gau = [r for r in rows if r["family"] == "gau"]
    block = {(r["params"]["causal"], int(r["params"]["n"])): r for r in gau if r["variant"] == "MhaFfn"}
    flash = {(r["params"]["causal"], int(r["params"]["n"])): r for r in gau if r["variant"] == "Flash"}
    if not block or not flash:
        return []
    lines = ["", "## GAU and FLASH vs MHA + FFN of the same parameter count (d = 512, one thread)", "",
             "| layer | causal | n | time (ms) | GFLOP/s | MHA + FFN (ms) | speed-up | peak heap (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    def name(r):
        return "FLASH" if r["variant"] == "Flash" else f"GAU {r['params']['norm']}"
    for r in sorted((r for r in gau if r["variant"] != "MhaFfn"),
                    key=lambda r: (name(r), r["params"]["causal"], int(r["params"]["n"]))):
        key = (r["params"]["causal"], int(r["params"]["n"]))
        b = block.get(key)
        lines.append(f"| {name(r)} | {key[0]} | {key[1]} | {r['ms']:.3f} | {fmt(r['gflops'])} | "
                     f"{b['ms']:.3f} | {b['ms'] / r['ms']:.2f}x | {fmt(r['heap_mib'], 2)} |" if b else
                     f"| {name(r)} | {key[0]} | {key[1]} | {r['ms']:.3f} | {fmt(r['gflops'])} | | | |")
    lines += ["", "| FLASH | time(16384) / time(1024), best calls (linear = 16) | faster than MHA + FFN from n = |", "|---|---:|---:|"]
    for causal in sorted({c for c, _ in flash}):
        runs = {n: r for (c, n), r in flash.items() if c == causal}
        faster = [n for n in sorted(runs) if (causal, n) in block and runs[n]["ms"] < block[(causal, n)]["ms"]]
        # the first n from which FLASH stays faster at every larger n
        first = next((n for n in sorted(runs) if all(m in faster for m in sorted(runs) if m >= n)), None)
        lines.append(f"| causal={causal} | {growth(runs, 1024, 16384)} | {first if first else 'not reached'} |")
    return lines


def decode_section(rows):
    """Decoding: bytes of K and V read per second, against a plain streaming read of as many bytes (pct_read_bw)."""
    decode = [r for r in rows if r.get("kv_gbps") is not None]
    if not decode:
        return []
    lines = ["", "## Decoding: K and V read per second", "",
             "100% of the streaming read is what a vectorised sum over the same bytes on the same threads gets. "
             "A layer's step also reads its projection weights: the last two columns count them too (all the bytes "
             "the step reads, against a streaming read of as many).", "",
             "| family | variant | parameters | time (us) | K/V GB/s | % of streaming read | step GB/s (K/V + weights) "
             "| % of streaming read |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(decode, key=lambda r: (r["family"], r["variant"], sorted(r["params"].items()))):
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['family']} | {r['variant']} | {params} | {r['ms'] * 1e3:.1f} | {fmt(r['kv_gbps'])} | "
                     f"{fmt(r['pct_read_bw'])} | {fmt(r.get('step_gbps'))} | {fmt(r.get('pct_step_read_bw'))} |")
    return lines


def pages_section(rows):
    """The SparsePages and LinearPages rows: growth 4096 -> 65536 with the rows in 4 KiB pages and in 2 MiB pages."""
    groups = defaultdict(dict)
    for r in rows:
        if r["variant"] in ("SparsePages", "LinearPages"):
            rest = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k not in ("n", "page_KiB"))
            groups[(r["variant"], rest)][(r["params"]["page_KiB"], int(r["params"]["n"]))] = r
    if not groups:
        return []
    lines = ["", "## Growth with the rows in 4 KiB and in 2 MiB pages (one thread)", "",
             "q, k, v and the output in memory of their own, placed alike, in 4 KiB pages or marked for transparent "
             "huge pages (bench_util.hpp, PagedRows); LinearPages is elu+1.", "",
             "| variant | parameters | time(65536) / time(4096), best calls: 4 KiB pages | 2 MiB pages |",
             "|---|---|---:|---:|"]
    for (variant, rest), runs in sorted(groups.items()):
        cells = []
        for pages in ("4", "2048"):
            series_runs = {n: r for (p, n), r in runs.items() if p == pages}
            cells.append(growth(series_runs, 4096, 65536))
        lines.append(f"| {variant} | {rest} | {cells[0]} | {cells[1]} |")
    return lines


def summary(rows, context, results):
    peak = context.get("fma_peak_gflops_per_core", "?")
    lines = [
        "# attnkit benchmark summary", "",
        f"Machine: {context.get('num_cpus', '?')} CPUs at {context.get('mhz_per_cpu', '?')} MHz, "
        f"measured fp32 FMA peak {fmt(float(peak)) if peak != '?' else '?'} GFLOP/s per core; run {context.get('date', '?')}.",
        "max error: the kernel's largest error relative to the largest output, against double precision on a small "
        "problem of the same kind (float kernels: about 1e-7 to 1e-5).",
        "% of peak: of the mean call; best call: of the fastest (the host is shared: other tenants only slow calls "
        "down, and the peak is the best of its trials).",
        "", "| family | variant | parameters | time (ms) | GFLOP/s | % of peak | % of peak, best call | peak heap (MiB) | "
        "workspace (MiB) | max error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def order(r):
        return (r["family"], r["variant"], sorted((k, int(v) if v.isdigit() else v) for k, v in r["params"].items()))
    for r in sorted(rows, key=order):
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['family']} | {r['variant']} | {params} | {r['ms']:.3f} | {fmt(r['gflops'])} | "
                     f"{fmt(r['pct_peak'])} | {fmt(r['pct_peak_best'])} | {fmt(r['heap_mib'], 2)} | "
                     f"{fmt(r['workspace_mib'], 2)} | "
                     f"{sci(r['max_err'])} |")
    lines += sparse_section(rows)
    lines += linear_section(rows)
    lines += pages_section(rows)
    lines += synthesizer_section(rows)
    lines += gau_section(rows)
    lines += decode_section(rows)
    path = os.path.join(results, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def overview(rows, context, results):
    """overview.md: one row per (family, variant, parameters but n) at the smallest and largest n it ran, one thread
    where the benchmark has a thread count. The README's benchmark table is this file (bench/update_readme.py)."""
    peak = context.get("fma_peak_gflops_per_core", "?")
    groups = defaultdict(list)
    for r in rows:
        if "n" not in r["params"] or r["params"].get("threads", "1") != "1":
            continue
        rest = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k not in ("n", "threads"))
        groups[(r["family"], r["variant"], rest)].append(r)
    lines = [
        f"From `make bench` on {context.get('date', '?')[:10]}: {context.get('num_cpus', '?')} CPUs, measured fp32 FMA "
        f"peak {fmt(float(peak)) if peak != '?' else '?'} GFLOP/s per core. One thread where a benchmark has a thread "
        "count (the multi-head layer runs on all cores; its % of peak is of all of them). Time and heap at the smallest "
        "and the largest n each benchmark ran; growth is their time ratio, to set against the ratio of the two n "
        "(linear cost) or its square (quadratic). "
        "Workspace is the library's documented upper bound for the call (`*_workspace_bytes`); for the materialising baselines, their n x n matrix. Every row of the run: "
        "`summary.md`.",
        "",
        "| family | variant | parameters | n | time (ms) | GFLOP/s | % of peak | growth | heap (MiB) | workspace (MiB) "
        "| max error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (family, variant, rest), v in sorted(groups.items()):
        v = sorted(v, key=lambda r: int(r["params"]["n"]))
        small, large = v[0], v[-1]
        ns = f"{small['params']['n']} / {large['params']['n']}" if len(v) > 1 else small["params"]["n"]
        times = f"{small['ms']:.3g} / {large['ms']:.3g}" if len(v) > 1 else f"{small['ms']:.3g}"
        grew = f"{large['ms'] / small['ms']:.1f}x" if len(v) > 1 and small["ms"] > 0 else ""
        heaps = f"{fmt(small['heap_mib'], 2)} / {fmt(large['heap_mib'], 2)}" if len(v) > 1 else fmt(small["heap_mib"], 2)
        lines.append(f"| {family} | {variant} | {rest} | {ns} | {times} | {fmt(large['gflops'])} | "
                     f"{fmt(large['pct_peak'])} | {grew} | {heaps} | {fmt(large['workspace_mib'], 2)} | "
                     f"{sci(large['max_err'])} |")
    path = os.path.join(results, "overview.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    results = sys.argv[1]
    rows, context = load(results)
    if not rows:
        sys.exit(f"no benchmark results in {results}")
    written = [
        plot(rows, results, "ms", "time per call (ms)", "time.png", "Time per call (solid: full, dashed: causal)",
             per_family=True),
        plot(rows, results, "heap_mib", "peak heap per call (MiB)", "memory.png", "Peak heap per call",
             per_family=True),
        plot(rows, results, "ms", "time per call (ms)", "sparse.png", "Sparse patterns vs dense attention (d = 64)",
             only=lambda g: g[0] == "sparse"),
        plot(rows, results, "gflops", "GFLOP/s", "gflops.png", "Exact attention throughput (FLOPs = 4 d per pair)",
             only=lambda g: g[0] == "sdpa", logy=False),
        summary(rows, context, results),
        overview(rows, context, results),
    ]
    for w in written:
        if w:
            print("wrote", w)
    print("\n".join(synthesizer_section(rows) + gau_section(rows)))


if __name__ == "__main__":
    main()
