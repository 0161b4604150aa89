"""Results of speed runs: the summary (medians per system and method, the ratios the issue asks
for), ``table.md`` and the plots (also used by :mod:`~benchmarks.speed.combine`)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.speed.config import OUR_METHODS, TARGETS


def describe(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians per (system, method) and the ratios the issue asks for."""
    per: dict[str, dict[str, Any]] = {}
    for run in result.get("runs", []):
        key = f"{run['system']}/{run['method']}"
        d = per.setdefault(key, {"system": run["system"], "method": run["method"], "batch_s": [], "phases": {},
                                 "tokens_per_s": [], "peak_rss_mib": [], "peak_rss_tree_mib": [], "steps": []})
        d["batch_s"] += run["batch_wall_s"]
        for ph in run["phases"]:
            for k, v in ph.items():
                if k != "steps":
                    d["phases"].setdefault(k, []).append(v)
            for s in (ph.get("steps") or {}).values():
                d["steps"] += s
        d["tokens_per_s"] += [x for x in run["target_tokens_per_s"] if x is not None]
        d["peak_rss_mib"].append(run["edit"]["peak_rss_mib"])
        d["peak_rss_tree_mib"].append(run["edit"]["peak_rss_tree_mib"])
        if "quality" in run:
            d["quality"] = {k: run["quality"].get(k) for k in ("efficacy", "generalization", "specificity")}
    methods: dict[str, Any] = {}
    for key, d in per.items():
        plain = result.get("plain", {}).get(key, {})
        tps = describe(d["tokens_per_s"])["median"]
        methods[key] = {
            "system": d["system"], "method": d["method"],
            "batch_s": describe(d["batch_s"]),
            "phases_s": {k: describe(v)["median"] for k, v in d["phases"].items()},
            "steps_mean": sum(d["steps"]) / len(d["steps"]) if d["steps"] else None,
            "target_tokens_per_s": tps,
            "plain_tokens_per_s": plain.get("tokens_per_s"),
            "throughput_ratio": ratio(tps, plain.get("tokens_per_s")),
            "peak_rss_mib": max(d["peak_rss_mib"]) if d["peak_rss_mib"] else None,
            "peak_rss_tree_mib": max(d["peak_rss_tree_mib"]) if d["peak_rss_tree_mib"] else None,
            "quality": d.get("quality"),
        }
    stats: dict[str, Any] = {}
    for s in result.get("statistics", []):
        stats.setdefault(s["system"], {}).setdefault(str(s["n_samples"]), []).append(s)
    stats_summary = {
        sys_: {n: {"seconds": describe([x["seconds"] for x in xs]), "peak_rss_mib": max(x["peak_rss_mib"] for x in xs),
                   "peak_rss_tree_mib": max(x["peak_rss_tree_mib"] for x in xs)} for n, xs in by.items()}
        for sys_, by in stats.items()
    }
    ratios: dict[str, Any] = {}
    n_main = str(result.get("hparams", {}).get("mom2_n_samples"))
    ours_st = stats_summary.get("ours", {}).get(n_main, {}).get("seconds", {}).get("median")
    ee_st = stats_summary.get("easyedit", {}).get(n_main, {}).get("seconds", {}).get("median")
    ratios["statistics_cold"] = ratio(ours_st, ee_st)
    for key, m in methods.items():
        if m["system"] != "ours":
            continue
        ee = methods.get(f"easyedit/{OUR_METHODS[m['method']][0]}")
        if ee is None:
            continue
        qo, qe = (m.get("quality") or {}), (ee.get("quality") or {})
        ratios[f"batch/{m['method']}"] = ratio(m["batch_s"]["median"], ee["batch_s"]["median"])
        ratios[f"efficacy_not_lower/{m['method']}"] = (
            None if qo.get("efficacy") is None or qe.get("efficacy") is None else qo["efficacy"] >= qe["efficacy"])
    scaling: dict[str, dict[str, float]] = {}
    for run in result.get("scaling", []):
        scaling.setdefault(f"{run['system']}/{run['method']}", {})[str(run["batch_size"])] = run["batch_wall_s"][0]
    return {"methods": methods, "statistics": stats_summary, "ratios": ratios, "scaling": scaling}


def fmt(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render_table(result: dict[str, Any]) -> str:
    """Markdown: the run's header (command, load, threads), the headline ratios against the
    issue's targets, and one row per (system, method)."""
    s = result["summary"]
    cfg = result["config"]
    hp = result.get("hparams", {})
    mach = result.get("machine", {})
    lines = [
        "## Speed: blue_plugin vs EasyEdit",
        "",
        f"Command: `{result.get('command') or 'n/a'}`",
        "",
        f"Model {cfg['model']}, N = {cfg['n']} CounterFact edits ({Path(cfg['data']).name}), B = {cfg['batch_size']}, "
        f"{cfg['reps']} repetitions (alternating), statistics: {hp.get('mom2_n_samples')} docs of "
        f"{Path(str(hp.get('mom2_dataset'))).name}, critical layers {hp.get('layers')}, v_num_grad_steps "
        f"{hp.get('v_num_grad_steps')}, v_lr {hp.get('v_lr')}. Isolation: {cfg['isolation']}.",
        "",
        f"Machine: {mach.get('cpu')} ({mach.get('cpu_count')} CPUs), torch threads "
        f"{ {k: v.get('torch_threads') for k, v in result.get('workers', {}).items()} }, load average at start "
        f"{[round(x, 2) for x in result.get('load_average_start', [])]}, at end "
        f"{[round(x, 2) for x in result.get('load_average_end', [])]}; wall {fmt(result.get('wall_s'), '{:.0f}')} s.",
        "",
        "| quantity | ours | EasyEdit | ratio ours/EasyEdit | target |",
        "|---|---|---|---|---|",
    ]
    st = s["statistics"]
    n_main = str(hp.get("mom2_n_samples"))
    o = st.get("ours", {}).get(n_main, {})
    e = st.get("easyedit", {}).get(n_main, {})
    lines.append(
        f"| statistics, layers {hp.get('layers')}, cold (s, median) | {fmt(o.get('seconds', {}).get('median'))} | "
        f"{fmt(e.get('seconds', {}).get('median'))} | {fmt(s['ratios'].get('statistics_cold'), '{:.3f}')} | <= {TARGETS['stats_ratio_max']} |")
    M = s["methods"]
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        r = s["ratios"].get(f"batch/{m['method']}")
        lines.append(
            f"| s / batch, ours {m['method']} vs EasyEdit {OUR_METHODS[m['method']][0]} (median) | "
            f"{fmt(m['batch_s']['median'])} | {fmt((ee.get('batch_s') or {}).get('median'))} | {fmt(r, '{:.3f}')} | "
            f"<= {TARGETS['batch_ratio_max']} |")
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        qo, qe = (m.get("quality") or {}), (ee.get("quality") or {})
        lines.append(f"| efficacy, {m['method']} vs {OUR_METHODS[m['method']][0]} | {fmt(qo.get('efficacy'))} | "
                     f"{fmt(qe.get('efficacy'))} | | ours >= EasyEdit |")
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        lines.append(f"| target-opt. tokens/s / plain fwd+bwd tokens/s, {m['method']} | {fmt(m['throughput_ratio'])} | "
                     f"{fmt(ee.get('throughput_ratio'))} | | >= {TARGETS['throughput_ratio_min']} (ours) |")
    for key, m in M.items():
        if m["system"] != "ours":
            continue
        ee = M.get(f"easyedit/{OUR_METHODS[m['method']][0]}", {})
        lines.append(f"| peak RSS editing (MiB, process + children), {m['method']} | {fmt(m['peak_rss_tree_mib'], '{:.0f}')} | "
                     f"{fmt(ee.get('peak_rss_tree_mib'), '{:.0f}')} | | < {TARGETS['peak_rss_mib_max']:.0f} (ours) |")
    lines += [
        "",
        "| system / method | s / batch median [min, max] (n) | targets / keys / update s | steps (mean) | "
        "target tokens/s | plain fwd+bwd tokens/s | peak RSS MiB (VmHWM / tree) | efficacy | generalization | specificity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, m in M.items():
        b, ph, q = m["batch_s"], m["phases_s"], m.get("quality") or {}
        lines.append(
            f"| {key} | {fmt(b['median'])} [{fmt(b['min'])}, {fmt(b['max'])}] ({b['n']}) | "
            f"{fmt(ph.get('targets'))} / {fmt(ph.get('keys'))} / {fmt(ph.get('update'))} | {fmt(m['steps_mean'], '{:.1f}')} | "
            f"{fmt(m['target_tokens_per_s'], '{:.0f}')} | {fmt(m['plain_tokens_per_s'], '{:.0f}')} | "
            f"{fmt(m['peak_rss_mib'], '{:.0f}')} / {fmt(m['peak_rss_tree_mib'], '{:.0f}')} | {fmt(q.get('efficacy'))} | "
            f"{fmt(q.get('generalization'))} | {fmt(q.get('specificity'))} |")
    if any(len(v) > 1 for v in st.values()) or len(st.get("ours", {})) > 1:
        lines += ["", "| statistics (cold) | samples | seconds (median) | peak RSS MiB (tree) |", "|---|---|---|---|"]
        for sys_, by in st.items():
            for n, v in sorted(by.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {sys_} | {n} | {fmt(v['seconds']['median'])} | {fmt(v['peak_rss_tree_mib'], '{:.0f}')} |")
    if s["scaling"]:
        Bs = sorted({int(b) for v in s["scaling"].values() for b in v})
        lines += ["", "| s / batch (one batch) | " + " | ".join(f"B={b}" for b in Bs) + " |", "|---|" + "---|" * len(Bs)]
        for key, v in s["scaling"].items():
            lines.append(f"| {key} | " + " | ".join(fmt(v.get(str(b))) for b in Bs) + " |")
    prep = result.get("prepare", {})
    if prep:
        lines += ["", "Prepare (statistics from disk, context templates, projectors), s: "
                  + ", ".join(f"{k} {fmt(v.get('seconds'))}" for k, v in prep.items()) + "."]
    lines += ["", "Tokens/s: batch x padded length of every forward call of the decoder during the target phase "
              "over the phase's wall time; ours replays the blocks below the edited layer from a cache (work skipped), "
              "so its ratio can exceed 1; with its prefix cache only the tokens from the subject's last token on "
              "are run and counted. Peak RSS 'tree' includes child processes (EasyEdit's data-loader workers)."]
    return "\n".join(lines) + "\n"


def make_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    """``per_batch_vs_B.png`` (scaling) and ``stats_vs_samples.png`` (statistics curve), when
    the run measured them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    s = result["summary"]
    if s["scaling"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for key, v in s["scaling"].items():
            pts = sorted((int(b), t) for b, t in v.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("seconds per batch")
        ax.set_title("Per-batch edit time (statistics cached)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "per_batch_vs_B.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["scaling_plot"] = str(p)
    st = s["statistics"]
    if any(len(by) > 1 for by in st.values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for sys_, by in st.items():
            pts = sorted((int(n), v["seconds"]["median"]) for n, v in by.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sys_)
        ax.set_xlabel("corpus documents")
        ax.set_ylabel("seconds (cold, all critical layers)")
        ax.set_title("Key statistics time vs sample count")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "stats_vs_samples.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written["stats_plot"] = str(p)
    return written
