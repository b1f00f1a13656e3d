"""`fastgrpo bench`'s outputs: the markdown table and the chart of its cells' results (fastgrpo.bench runs them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SERIES = [("fastgrpo", "colocate"), ("fastgrpo", "async"), ("fastgrpo", "novllm"), ("fastgrpo", "server"),
          ("fastgrpo", "server-async"), ("trl", "colocate"), ("trl", "novllm"), ("trl", "server"),
          ("trl", "server-async"), ("vllm", "alone")]
COLORS = ["#1f77b4", "#17becf", "#9ecae1", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#ff7f0e", "#ffbb78"]


def _order(r: dict) -> tuple:
    s = (r["framework"], r["mode"])
    return r["G"], r["L"], SERIES.index(s) if s in SERIES else 99, r.get("variant") or ""


def _f(x, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def summarize(results: list[dict]) -> str:
    """The markdown table of `results` (what each column measures: the module docstring and the table's footnote)."""
    ok = [r for r in results if r.get("s_per_step")]  # partial (timed-out) cells too: their steps were real
    base = [r for r in ok if not r.get("variant")]  # the references: TRL and vLLM alone as they come
    trl = {(r["mode"], r["G"], r["L"]): r["s_per_step"] for r in base if r["framework"] == "trl"}
    vllm = {(r["G"], r["L"]): r["s_per_step"] for r in base if r["framework"] == "vllm"}
    lines = ["| framework | mode | G | L | s/step (median) | it/s | gen tok/s | peak GPU GiB (torch) | "
             "time split gen/train/other s | ÷ TRL | ÷ vLLM-alone | notes |", "|" + "---|" * 12]
    for r in sorted(results, key=_order):
        s, sp, notes = r.get("s_per_step"), r.get("split") or {}, []
        if r.get("error"):
            notes.append(("FAILED: " if not s else "partial: ") + r["error"][:200])
        if r["framework"] == "trl" and (r.get("config") or {}).get("gradient_checkpointing"):
            notes.append("gradient_checkpointing on (TRL default)")
        if r.get("variant"):
            notes.append("variant: " + json.dumps(r.get("variant_fields") or {}))
        if r.get("dropped_extra"):  # --extra / --variant fields this framework's config lacks: not applied
            notes.append(f"not in {r['framework']}'s config, so not applied: {', '.join(r['dropped_extra'])}")
        if r["framework"] == "vllm":
            notes.append("vLLM generate() alone, ignore_eos"
                         + (f"; runs around the other cells, in order: {', '.join(_f(x['s_per_step']) for x in r['runs'])} s"
                            if r.get("runs") else ""))
        split = "—" if sp.get("gen") is None else (f"{sp['gen']:.1f}{'‖' if sp.get('overlapped') else ''} / "
                                                   f"{_f(sp.get('train'), '{:.1f}')} / {_f(sp.get('other'), '{:.1f}')}")
        mem = _f(r.get("gpu_peak_used_gib"), "{:.1f}") + _f(r.get("torch_peak_reserved_gib"), " ({:.1f})").replace("—", "")
        ref = trl.get(("colocate" if r["mode"] == "async" else r["mode"], r["G"], r["L"]))
        if r["framework"] == "trl" and r["mode"] == "server-async":
            notes.append("AsyncGRPOTrainer" + ("; tree attention on PyTorch SDPA (FA3 kernel not loadable)"
                                               if "SDPA" in str(r.get("config", {}).get("tree_attention")) else ""))
        vl, ours = vllm.get((r["G"], r["L"])), r["framework"] != "vllm" and s
        lines.append("| " + " | ".join([
            r["framework"], r["mode"] + (f" @{r['variant']}" if r.get("variant") else ""), str(r["G"]), str(r["L"]), _f(s), _f(r.get("it_per_s"), "{:.3f}"),
            _f(r.get("gen_tok_per_s"), "{:,.0f}"), mem, split, _f(s / ref if ours and ref else None),
            _f(s / vl if ours and vl else None), "; ".join(notes).replace("|", "/").replace("\n", " ")]) + " |")
    devices = sorted({r["device"] for r in results if r.get("device")})
    lines += ["", f"Device: {', '.join(devices) or 'unknown'}. s/step: median of steps 2..N, wall clock between step "
              "ends. ÷ TRL: s/step over TRL's at the same mode, G, L (async over TRL colocate); < 1 is faster. "
              "÷ vLLM-alone: over vLLM generating the same tokens alone. Time split: medians; ‖ = async generation, "
              "overlapped with training. Peak GPU: nvidia-smi used minus before the cell (worker's "
              "torch.cuda.max_memory_reserved)."]
    return "\n".join(lines) + "\n"


def write_chart(results: list[dict], path: str) -> None:
    """Grouped bars of s/step, one panel per L, one group per G, one color per framework/mode (hatched: partial);
    vLLM alone is a black dashed line with a diamond across its group. Variant rows (--variant) are in the table
    only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if not r.get("variant")]
    if not results:
        return
    gens, lengths = sorted({r["G"] for r in results}), sorted({r["L"] for r in results})
    series = [s for s in SERIES[:-1] if any((r["framework"], r["mode"]) == s for r in results)]
    by, width = {(r["framework"], r["mode"], r["G"], r["L"]): r for r in results}, 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(len(lengths), 1, squeeze=False, figsize=(
        max(6.5, 1.5 + len(gens) * (0.6 + 0.55 * len(series))), 1.3 + 3.6 * len(lengths)))
    legend: dict = {}
    for ax, length in zip(axes[:, 0], lengths):
        for i, g in enumerate(gens):
            for j, s in enumerate(series):
                r, x = by.get((*s, g, length)), i - 0.4 + width * (j + 0.5)
                if r is not None and r.get("s_per_step"):
                    bar = ax.bar(x, r["s_per_step"], width, color=COLORS[SERIES.index(s)],
                                 hatch="//" if r.get("error") else None)
                    ax.bar_label(bar, fmt="%.1f", fontsize=8)
                    legend.setdefault(f"{s[0]} {s[1]}", bar)
                elif r is not None:
                    ax.text(x, 0, " failed", rotation=90, ha="center", va="bottom", fontsize=8, color="red")
            r = by.get(("vllm", "alone", g, length))
            if r and r.get("s_per_step"):
                ax.hlines(r["s_per_step"], i - 0.42, i + 0.42, colors="black", linestyles="--", linewidth=1.2, zorder=4)
                ax.text(i + 0.42, r["s_per_step"], f"{r['s_per_step']:.1f}", ha="right", va="bottom", fontsize=8)
                legend.setdefault("vLLM alone (generate only)", ax.scatter(
                    [i - 0.42], [r["s_per_step"]], marker="D", s=40, color="black", zorder=5))
        ax.set_xticks(range(len(gens)), [f"G={g}" for g in gens])
        ax.set_title(f"max_completion_length L={length}", fontsize=10)
        ax.set_ylabel("s/step (median; lower is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    axes[0, 0].legend(legend.values(), legend.keys(), fontsize=8, loc="best")
    cps = "/".join(sorted({str(r.get("completions_per_step", "?")) for r in results}))
    devices = ", ".join(sorted({r["device"] for r in results if r.get("device")}))
    fig.suptitle(f"GRPO seconds per optimizer step, fastgrpo vs TRL\n{cps} completions per step, LoRA r=8; {devices}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_outputs(out: Path, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(results, key=_order)))
    (out / "table.md").write_text(summarize(results))
    try:
        write_chart(results, str(out / "chart.png"))
    except ImportError as e:
        print(f"[bench] no chart.png ({e}): pip install matplotlib", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the chart is a view of results.jsonl; it must never end a bench run
        print(f"[bench] no chart.png ({type(e).__name__}: {e}); results.jsonl and table.md are written",
              file=sys.stderr)


def _load(paths) -> list[dict]:
    """Results of several files, one per cell: a later file's result for a cell replaces an earlier one (a rerun),
    except that a failed or unrun cell never replaces one that has timed steps."""
    cells: dict[str, dict] = {}
    for p in paths:
        if not Path(p).exists():
            print(f"[bench] --report: no such file {p}", file=sys.stderr)
            continue
        for ln in Path(p).read_text().splitlines():
            if not ln.strip():
                continue
            r = json.loads(ln)
            key = r.get("key") or json.dumps([r.get(k) for k in ("framework", "mode", "G", "L")])
            old = cells.get(key)
            if old is None or not r.get("error") or old.get("error"):
                cells[key] = r
    return list(cells.values())
