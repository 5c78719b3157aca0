"""Benchmark results as files: the JSON document, its markdown tables and a latency plot.

``write_results`` names them ``<device>_<preset>_<modes>_<shapes>[_original]`` under the output folder;
``bench/report.py`` renders the committed JSON files with the same tables into ``docs/benchmarks.md`` and
the README's headline table.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from ..atomic import atomic_text, atomic_write
from ..model.config import CBraModConfig
from .device import model_flops


def result_stem(doc: dict) -> str:
    dev = doc["device"]
    if dev["type"] == "cpu":
        slug = "cpu" + ("-" + re.sub(r"[^a-z0-9]+", "", dev["uarch"].lower()) if dev.get("uarch") else "")
    else:
        slug = "cuda-" + re.sub(r"[^a-z0-9]+", "-", dev["name"].lower()).strip("-")
    a = doc["args"]
    shapes = "-".join(f"{c}x{n}" for c, n in a["shapes"])
    suffix = "_original" if a.get("original") else ""
    return f"{slug}_{a['preset']}_{'-'.join(a['modes'])}_{shapes}{suffix}"


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


_COMPILE_LABELS = {"compile": " + torch.compile", "compile-ro": " + compile (reduce-overhead)",
                   "compile-layers": " + torch.compile per layer",
                   "graph": " + CUDA graph"}


def variant_label(r: dict) -> str:
    label = f"cbramod-fast ({r['backend']})" if r["model"] == "fast" else r["model"]
    label += _COMPILE_LABELS.get(r.get("compile") or "", "")
    if r.get("failed"):
        return f"{label}, FAILED in {r['failed'].split(':')[0]}"
    return label if r["timed"] else f"{label}, interpreter: error only"


def _speedup_text(r: dict) -> str:
    text = _fmt(r["speedup_vs_reference"], ".2f")
    rounds = r.get("speedup_vs_reference_rounds")
    if rounds and r["model"] != "reference":
        text += f" ({rounds['p10']:.2f}–{rounds['p90']:.2f})"
    return text


def markdown_table(doc: dict) -> str:
    """The result table of one run (used for the .md file and by bench/report.py for the README)."""
    lines = [("| mode | C×N | batch | variant | dtype | p50 ms | p90 ms | p99 ms | samples/s | GFLOP/s | "
              "util. | peak MiB | × ref | × ref fp32 | CPU-time p50 ms | × ref (CPU time) | rel. err |"),
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        lat = r["latency_s"] or {}
        err = _fmt(r["rel_err_vs_fp32_reference"], ".1e")
        if r.get("grad_rel_err_vs_fp32_reference") is not None:
            err += f" (grad {r['grad_rel_err_vs_fp32_reference']:.1e})"
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        lines.append(
            f"| {r['mode']} | {r['channels']}×{r['patches']} | {r['batch']} | {variant_label(r)} | {r['dtype']} | "
            f"{_fmt(lat.get('p50') and lat['p50'] * 1e3, '.1f')} | {_fmt(lat.get('p90') and lat['p90'] * 1e3, '.1f')} | "
            f"{_fmt(lat.get('p99') and lat['p99'] * 1e3, '.1f')} | {_fmt(r['samples_per_s'], '.1f')} | "
            f"{_fmt(r['flops_per_s'] and r['flops_per_s'] / 1e9, '.1f')} | "
            f"{_fmt(r['utilisation'] and r['utilisation'] * 100, '.1f')}{'' if r['utilisation'] is None else ' %'} | "
            f"{_fmt(mem, '.1f')} | {_speedup_text(r)} | "
            f"{_fmt(r['speedup_vs_reference_fp32'], '.2f')} | "
            f"{_fmt(r.get('cpu_time_s') and r['cpu_time_s']['p50'] * 1e3, '.1f')} | "
            f"{_fmt(r.get('speedup_vs_reference_cpu_time'), '.2f')} | {err} |")
    return "\n".join(lines)


def summary_table(summary: list[dict]) -> str:
    """Markdown of :func:`.harness.kernel_summary` (empty string when there is nothing to compare)."""
    if not summary:
        return ""
    lines = [("| mode | C×N | batch | (a) fp32 eager | samples/s | (b) best torch-native | samples/s | "
              "(c) ours, Triton | samples/s | p50 ms (c) | (c)/(a) | (c)/(b) | util. (c) |"),
             "|---|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        a, b, c = s["a"], s["b"], s["c"]
        lines.append(
            f"| {s['mode']} | {s['channels']}×{s['patches']} | {s['batch']} | {a['variant'] if a else '–'} | "
            f"{_fmt(a and a['samples_per_s'], '.1f')} | {b['variant'] + ' ' + b['dtype'] if b else '–'} | "
            f"{_fmt(b and b['samples_per_s'], '.1f')} | {c['variant']} {c['dtype']} | {c['samples_per_s']:.1f} | "
            f"{c['p50_s'] * 1e3:.3f} | {_fmt(s['c_over_a'], '.2f')} | {_fmt(s['c_over_b'], '.2f')} | "
            f"{_fmt(c['utilisation'] and c['utilisation'] * 100, '.1f')}{'' if c['utilisation'] is None else ' %'} |")
    return "\n".join(lines)


def cpu_path_lines(doc: dict) -> str:
    """What the fast model's timed calls ran on CPU (``model.cpu_path``): one line per variant, dtype and
    path, naming the groups. Empty for GPU runs and for files written before the field existed."""
    where: dict[tuple[str, str, str], dict[tuple[str, int, int], list[int]]] = {}
    for r in doc["results"]:
        if doc["device"]["type"] != "cpu" or r["model"] != "fast" or "cpu_path" not in r or not r["repeats"]:
            continue
        if r["cpu_path"] is None and r["mode"] == "train":
            continue  # training steps never take the inference plan
        path = f"`{r['cpu_path']}`" if r["cpu_path"] else "no CPU inference plan (a torch.compile graph)"
        groups = where.setdefault((variant_label(r), r["dtype"], path), {})
        groups.setdefault((r["mode"], r["channels"], r["patches"]), []).append(r["batch"])
    if not where:
        return ""
    lines = ["CPU path of the timed calls (`model.cpu_path`, read after each call):", ""]
    for (label, dtype, path), groups in where.items():
        at = "; ".join(f"{m} {c}×{n} batch {', '.join(map(str, bs))}" for (m, c, n), bs in groups.items())
        lines.append(f"- {label} {dtype} ({at}): {path}")
    return "\n".join(lines)


def _repeats_text(doc: dict) -> str:
    counts = sorted({r["repeats"] for r in doc["results"] if r["timed"]})
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}" if counts else "0"
    return f"{span} interleaved rounds" + (" (auto)" if not doc["args"]["repeats"] else "")


def _compile_text(doc: dict) -> str:
    compiled = [r for r in doc["results"] if r.get("compile") in ("compile", "compile-ro", "compile-layers")
                or (doc["args"].get("compile") and "compile" not in r)]  # files from before per-variant tags
    firsts = [r["first_call_s"] for r in compiled if r["first_call_s"] is not None]
    return f", torch.compile (first calls incl. compilation: {min(firsts):.1f}–{max(firsts):.1f} s)" if firsts else ""


def device_label(dev: dict) -> str:
    return f"{dev['name']} ({dev['uarch']})" if dev.get("uarch") else dev["name"]


def markdown_header(doc: dict) -> str:
    dev, ver, git = doc["device"], doc["versions"], doc["git"]
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    peak = dev["peak_flops"]
    mcfg = doc["model_config"]
    a = doc["args"]
    fl = model_flops(CBraModConfig(**mcfg), *a["shapes"][0], 1, "infer") if a["shapes"] else None
    peaks = ", ".join(f"{k} {peak[k] / 1e9:.0f} GFLOP/s" for k in ("fp32", "bf16", "fp16") if peak.get(k))
    gemm = dev.get("gemm_flops_measured") or {}
    gemm_text = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in gemm.items())
    return "\n".join([
        (f"- device: **{device_label(dev)}** ({dev['type']}, {dev['torch_threads']} torch threads of "
         f"{dev['cpu_count']} CPUs); peak used for utilisation: {peaks or 'unknown'} — {peak['method']}"
         + (f"; measured square-matmul rate at start: {gemm_text}" if gemm_text else "")),
        f"- torch {ver['torch']}, triton {ver.get('triton') or '–'}, python {ver['python']}; "
        f"commit {commit}; {doc['created']}"
        + (f"; 1-min load average {doc['load_average']['before'][0]:.1f} before, "
           f"{doc['load_average']['after'][0]:.1f} after" if doc.get("load_average", {}).get("before") else ""),
        (f"- preset `{a['preset']}` ({mcfg['n_layer']} layers, ff {mcfg['dim_feedforward']}); "
         f"{fl / 1e9:.2f} GFLOP per {a['shapes'][0][0]}×{a['shapes'][0][1]} sample forward; warm-up "
         f"{a['warmup']}, repeats {_repeats_text(doc)}"
         f"{_compile_text(doc)}"),
    ] + _partial_lines(doc))


def _partial_lines(doc: dict) -> list[str]:
    part = doc.get("partial")
    if not part:
        return []
    return [(f"- **partial run**: {part['groups_done']} of {part['groups']} groups finished (results are "
             "written after each group; the run stopped there or is still going)")]


def render_markdown(doc: dict) -> str:
    summary = summary_table(doc.get("summary") or [])
    summary = (f"Summary: (a) original (else reference) fp32 eager, (b) fastest torch-native variant, (c) "
               f"fastest Triton variant, both bf16; ratios of p50 latencies.\n\n{summary}\n\n") if summary else ""
    paths = cpu_path_lines(doc)
    paths = f"{paths}\n\n" if paths else ""
    return (f"# cbramod-fast bench: {result_stem(doc)}\n\n{markdown_header(doc)}\n\n{summary}"
            f"{markdown_table(doc)}\n\n{paths}"
            "Definitions: " + "; ".join(f"**{k}**: {v}" for k, v in doc["definitions"].items()) + "\n")


def plot_latency(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in doc["results"] if r["latency_s"]]
    panels = sorted({(r["mode"], r["channels"], r["patches"]) for r in rows})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (mode, c, n) in zip(axes[0], panels):
        sel = [r for r in rows if (r["mode"], r["channels"], r["patches"]) == (mode, c, n)]
        models = list(dict.fromkeys(variant_label(r) for r in sel))
        dtypes = list(dict.fromkeys(r["dtype"] for r in sel))
        for (mi, model), (di, dt) in itertools.product(enumerate(models), enumerate(dtypes)):
            pts = sorted((r["batch"], r["latency_s"]["p50"] * 1e3) for r in sel
                         if variant_label(r) == model and r["dtype"] == dt)
            if pts:  # colour = model, line style = dtype
                ax.plot(*zip(*pts), marker="o", color=f"C{mi}", linestyle=("-", "--", ":")[di % 3],
                        label=f"{model} {dt}")
        batches = sorted({r["batch"] for r in sel})
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="p50 latency (ms)", title=f"{mode} {c}×{n}")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, handlelength=3.5)
    fig.suptitle(f"{device_label(doc['device'])} — preset {doc['args']['preset']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_results(doc: dict, out: str | Path, plot: bool = False) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(doc)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    atomic_text(paths[0], json.dumps(doc, indent=1) + "\n")
    atomic_text(paths[1], render_markdown(doc))
    if plot:
        paths.append(out / f"{stem}.png")
        plot_latency(doc, paths[-1])
    return paths
