"""The study's report: every number in ``study.json``, the tables in ``study.md``, PNG plots.

Everything is read back from the run directories (``config.yaml``, ``eval.jsonl``,
``metrics.jsonl``) and from ``decoding.json``, so the report can be rebuilt at any time.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Optional

import yaml

from apps.study.plans import FULL_CARD, REFERENCE, STUDIED, Plan, RunSpec
from card_megatron.fileio import atomic_open, atomic_write
from card_megatron.objectives import objective_names, objective_traits

PROBE_KS = (0, 1, 2, 3, 5, 7)


def read_step_records(path: str) -> list[dict]:
    """The records of a run's ``eval.jsonl`` or ``metrics.jsonl``, one per step in step order ([] without the file)."""
    if not os.path.exists(path):
        return []
    records = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                records[r["step"]] = r  # a resumed run may log a step twice: the last one counts
    return [records[k] for k in sorted(records)]


def collect_run(run_dir: str, run: RunSpec) -> dict:
    """One run's measurements: evaluations against tokens, step time, peak memory, last metrics."""
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    L, gbs = cfg["model"]["seq_length"], cfg["train"]["global_batch_size"]
    evals = read_step_records(os.path.join(run_dir, "eval.jsonl"))
    for e in evals:
        e["tokens"] = e["step"] * gbs * L
    metrics = read_step_records(os.path.join(run_dir, "metrics.jsonl"))
    # what tokens_per_sec counts: the model's positions (BD3LM reads concat(xt, x0), 2L per sample)
    positions = gbs * L * objective_traits(run.objective).sequence_length_multiplier
    step_times = [positions / m["tokens_per_sec"] for m in metrics[1:] if m.get("tokens_per_sec")]
    return {
        "name": run.name,
        "label": run.label,
        "group": run.group,
        "objective": run.objective,
        "seed": run.seed,
        "corpus": run.corpus,
        "overrides": list(run.overrides),
        "tokens_per_step": gbs * L,
        "valid_sequences": cfg["train"]["eval_iters"] * gbs,
        "valid_seed": cfg["data"].get("valid_seed"),
        "split": cfg["data"]["split"],
        "evals": evals,
        "final": evals[-1] if evals else None,
        "step_time_s": statistics.median(step_times) if step_times else None,
        "peak_memory_gb": max((m.get("memory_gb") or 0.0) for m in metrics) if metrics else None,
        "last_metrics": metrics[-1] if metrics else None,
    }


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarise(plan: Plan, runs: dict[str, dict], decoding: dict) -> dict:
    """The report's tables as data (see the module docstring of ``apps.study``)."""

    def final(r, key):
        return r["final"].get(key) if r.get("final") else None

    by_label: dict[str, list[dict]] = {}
    for r in runs.values():
        if r["corpus"] == "main":
            by_label.setdefault(r["label"], []).append(r)
    variants = []
    for label, rs in by_label.items():
        ppl = [final(r, "val_ppl") for r in rs if final(r, "val_ppl") is not None]
        row = {
            "label": label,
            "group": rs[0]["group"],
            "objective": rs[0]["objective"],
            "runs": [r["name"] for r in rs],
            "bound": bool(final(rs[0], "val_ppl_is_bound")),
            "tokens": rs[0]["final"]["tokens"] if rs[0].get("final") else None,
            "val_ppl": _spread(ppl) if ppl else None,
        }
        keys = {k for r in rs if r.get("final") for k in r["final"] if k.startswith("probe_")}
        keys |= {f"probe_{m}_k{k}" for m in ("acc", "conf") for k in PROBE_KS}
        for key in sorted(keys):
            vals = [final(r, key) for r in rs if final(r, key) is not None]
            row[key] = _spread(vals) if vals else None
        variants.append(row)
    # Like with like: each run against the reference run of the same seed (same validation sequences),
    # so a one-seed sweep row is read against full CARD of that seed, not against a two-seed mean.
    by_seed = {
        (r["label"], r["seed"]): final(r, "val_ppl") for r in runs.values() if r["corpus"] == "main" and r.get("final")
    }
    arm_label = objective_traits(REFERENCE).label
    for row in variants:
        reference = arm_label if row["group"] == "efficiency" and row["label"] != arm_label else FULL_CARD
        if row["label"] in (reference, arm_label) or (row["group"] == "efficiency" and row["objective"] != STUDIED):
            continue
        ratios = []
        for name in row["runs"]:
            r = runs[name]
            mine, ref = final(r, "val_ppl"), by_seed.get((reference, r["seed"]))
            if mine is not None and ref:
                ratios.append(mine / ref)
        row["vs_reference"] = {"reference": reference, **_spread(ratios)} if ratios else None
    _add_verify(variants, decoding.get("variants", {}).get("runs", {}))
    arm = [r for r in runs.values() if r["objective"] == REFERENCE and r["corpus"] == "main"]
    cost = []
    for objective in (REFERENCE, *(name for name in objective_names() if name != REFERENCE)):
        rs = [
            r for r in runs.values() if r["objective"] == objective and r["group"] == "efficiency" and r["step_time_s"]
        ]
        if not rs:
            continue
        t = statistics.fmean(r["step_time_s"] for r in rs)
        mem = max(r["peak_memory_gb"] or 0.0 for r in rs)
        row = {"objective": objective, "step_time_s": t, "peak_memory_gb": mem}
        if arm and arm[0]["step_time_s"]:
            row["step_time_vs_arm"] = t / statistics.fmean(r["step_time_s"] for r in arm if r["step_time_s"])
            row["memory_vs_arm"] = mem / max(r["peak_memory_gb"] or 0.0 for r in arm)
        cost.append(row)
    card_time = next((c["step_time_s"] for c in cost if c["objective"] == STUDIED), None)
    for c in cost:
        if card_time:
            c["step_time_vs_card"] = c["step_time_s"] / card_time
    return {"variants": variants, "cost": cost, "decoding": decoding}


def _add_verify(variants: list[dict], decoded: dict) -> None:
    """Each variant's verify-mode rows (decoding part ``variants``) as spreads over its seeds:
    ``verify`` maps K to tokens per forward; ``verify_identical`` is the smallest fraction of prompts
    whose output equalled AR's (1.0 by construction); ``ar_repetition`` the AR text's repeated 4-grams."""
    for row in variants:
        rows = [decoded[name]["rows"] for name in row["runs"] if decoded.get(name, {}).get("rows")]
        if not rows:
            continue
        by_k: dict[int, list[float]] = {}
        for rs in rows:
            for r in rs[1:]:
                by_k.setdefault(r["window"], []).append(r["tokens_per_forward"])
        row["verify"] = {k: _spread(v) for k, v in sorted(by_k.items())}
        row["verify_identical"] = min(r["same_as_first"] for rs in rows for r in rs[1:])
        row["ar_repetition"] = _spread([rs[0]["repetition_4gram"] for rs in rows])


def _fmt(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, dict):
        if x["n"] == 1:
            return f"{x['mean']:.{digits}f}"
        return f"{x['mean']:.{digits}f} [{x['min']:.{digits}f}, {x['max']:.{digits}f}]"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _decoding_table(rows: list[dict], best: Optional[dict], identical: Optional[dict] = None) -> list[str]:
    lines = [
        "| setting | tokens/forward | speed-up vs AR (wall) | judge ppl | entropy | rep. 4-grams | same text as AR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mark = ""
        if best is not None and r["setting"] == best["setting"]:
            mark = " **(best within 5%)**"
        if identical is not None and r["setting"] == identical["setting"] and r is not rows[0]:
            mark = " **(most tokens/forward identical to AR)**"
        if r.get("forced"):
            mark += " (forced)"
        lines.append(
            f"| {r['setting']}{mark} | {r['tokens_per_forward']:.2f} | {r['speedup']:.2f} | "
            f"{_fmt(r.get('judge_ppl'))} | {r['entropy']:.2f} | {r['repetition_4gram']:.2f} | "
            f"{r['same_as_first']:.2f} |"
        )
    return lines


def _ratio(row: dict) -> str:
    v = row.get("vs_reference")
    if not v:
        return "-"
    ref = "ARM" if v["reference"] == "ARM" else "full CARD"
    return f"{_fmt(v, 3)} x {ref}"


def markdown(plan: Plan, meta: dict, runs: dict[str, dict], summary: dict) -> str:
    """The tables of ``study.md``."""
    out = [
        f"# Study: plan `{plan.name}`",
        "",
        plan.description + ".",
        "",
        f"Machine: {meta['machine']}. Wall clock: {meta['elapsed_min']:.1f} min for the stages run this time "
        f"({meta['runs_trained_now']} run(s) trained now). Written {meta['written']}.",
        "",
        "Validation perplexity is exact for ARM and CARD (CARD on clean text is an AR model) and an upper bound "
        "(ELBO, marked <=) for MDLM and BD3LM. Every run validates on the same held-out sequences "
        f"(data.valid_seed {plan.valid_seed}; {meta.get('valid_sequences', '?')} sequences), so a spread "
        "(mean [min, max] over seeds) comes from the training seed alone, and a ratio against the reference "
        "run of the same seed (same data order and noise) is the like-for-like comparison.",
        "",
        "## Data efficiency (same model, data, tokens and optimizer)",
        "",
        "| objective | runs | tokens | validation perplexity | vs ARM, same seeds |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for v in summary["variants"]:
        if v["group"] == "efficiency":
            bound = "<= " if v["bound"] else ""
            out.append(
                f"| {v['label']} | {', '.join(v['runs'])} | {v['tokens']:,} | {bound}{_fmt(v['val_ppl'])} | "
                f"{_ratio(v)} |"
            )
    out += [
        "",
        "![perplexity against tokens](perplexity.png)",
        "",
        "## Training cost (from the same runs)",
        "",
        "| objective | step time (s) | vs ARM | vs CARD | peak memory (GB) | vs ARM |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in summary["cost"]:
        out.append(
            f"| {c['objective']} | {c['step_time_s']:.3f} | {_fmt(c.get('step_time_vs_arm'))} | "
            f"{_fmt(c.get('step_time_vs_card'))} | {c['peak_memory_gb']:.2f} | {_fmt(c.get('memory_vs_arm'))} |"
        )
    out += [
        "",
        f"Runs train {plan.jobs} at a time, one process each, so step times include the same contention "
        "for every objective; memory is the process's peak resident set (CPU) or peak allocated (GPU).",
        "",
        "## Ablations and sweeps (CARD)",
        "",
        "| variant | runs | validation perplexity | vs full CARD, same seeds |",
        "| --- | --- | ---: | ---: |",
    ]
    card_rows = [v for v in summary["variants"] if v["group"] in ("ablation", "sweep") or v["label"] == FULL_CARD]
    for v in card_rows:
        ratio = "reference" if v["label"] == FULL_CARD else _ratio(v)
        out.append(f"| {v['label']} | {', '.join(v['runs'])} | {_fmt(v['val_ppl'])} | {ratio} |")
    taus = [t for t in plan.decode.thresholds if t <= 1]
    n = next((v.get("probe_n_k1") for v in card_rows if v.get("probe_n_k1")), None)
    out += [
        "",
        "Probe: after a clean prefix (at least as long as a decoding prompt) and k [MASK], how often the "
        "prediction of the next position is right (acc) and how often its top-1 probability exceeds each "
        f"threshold tau of the decoding sweep (conf>tau, k = 1): what parallel decoding can use. "
        f"{_fmt(n['mean'], 0) if n else '?'} predictions per k and run.",
        "",
        "| variant | acc k=1 | acc k=3 | " + " | ".join(f"conf>{t:g} k=1" for t in taus) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(taus),
    ]
    for v in card_rows:
        confs = " | ".join(_fmt(v.get(f"probe_conf{t:g}_k1"), 3) for t in taus)
        out.append(f"| {v['label']} | {_fmt(v['probe_acc_k1'], 3)} | {_fmt(v['probe_acc_k3'], 3)} | {confs} |")
    verified = [v for v in card_rows if v.get("verify")]
    if verified:
        ks = sorted({k for v in verified for k in v["verify"]})
        out += [
            "",
            "Verify mode per variant (greedy, the same held-out prompts as the decoding section): tokens per "
            "forward at output identical to greedy AR, mean [min, max] over seeds. Drafts are accepted when "
            "they equal AR's argmax, so repetitive AR text is drafted more easily: the AR text's repeated "
            "4-grams are beside it.",
            "",
            "| variant | " + " | ".join(f"verify K={k}" for k in ks) + " | identical to AR | AR rep. 4-grams |",
            "| --- |" + " ---: |" * (len(ks) + 2),
        ]
        for v in verified:
            cells = " | ".join(_fmt(v["verify"].get(k)) for k in ks)
            out.append(f"| {v['label']} | {cells} | {v['verify_identical']:.2f} | {_fmt(v['ar_repetition'])} |")
    out += ["", "![ablations](ablations.png)", ""]
    dec = summary["decoding"]
    if dec.get("main"):
        out += [
            "## Decoding (main corpus)",
            "",
            f"CARD model `{dec['main']['model']}`, judge `{dec['main']['judge']}`, {dec['main']['num_prompts']} "
            f"held-out prompts, {dec['main']['max_new_tokens']} new tokens, batch = all prompts.",
            "",
            "Headline numbers that repetitive text cannot game: greedy, the most tokens per forward whose output "
            "is identical to greedy AR on every prompt (verify mode, when the decoder has it, by construction); "
            "sampled threshold decoding, the most tokens per forward within 5% of sampled AR's judge perplexity, "
            "with entropy and repeated 4-grams beside it. Rows marked (forced) commit what is left after at most "
            "the stated passes per block of K tokens (paper-style); they are never a headline.",
            "",
        ]
        families = [f for f in plan.decode.families if f.note]
        out += [f"* `{f.name}`: {f.note}" for f in families] + [""]
        for mode in ("greedy", "sampled"):
            part = dec["main"].get(mode)
            if part:
                table = _decoding_table(part["rows"], part.get("best"), part.get("identical"))
                out += [f"### {part['rows'][0]['mode']}", ""] + table + [""]
                seeds = [r["judge_ppl"] for r in part.get("ar_seeds", []) if r.get("judge_ppl") is not None]
                if len(seeds) > 1:
                    out += [
                        f"Sampled AR alone, {len(seeds)} sampling seeds on the same prompts: judge perplexity "
                        f"{_fmt(_spread(seeds))} (mean [min, max]). A row differing from AR by less than this "
                        "spread is not resolved by these prompts.",
                        "",
                    ]
        out += ["![speed against quality](decoding.png)", ""]
    if dec.get("curve", {}).get("points"):
        out += [
            "## Tokens per forward at output identical to AR (greedy), against training tokens",
            "",
            "| checkpoint | tokens | probe acc k=1 | probe conf k=1 | AR judge ppl | most tokens/forward identical "
            "to AR | tokens/forward |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for c in dec["curve"]["points"]:
            b = c.get("identical") or {}
            out.append(
                f"| {c['step']} | {c['tokens']:,} | {_fmt(c.get('probe_acc_k1'), 3)} | "
                f"{_fmt(c.get('probe_conf_k1'), 3)} | {_fmt(c['ar_judge_ppl'])} | {b.get('setting', '-')} | "
                f"{_fmt(b.get('tokens_per_forward'))} |"
            )
        out += ["", "![curve](curve.png)", ""]
    copy_runs = [r for r in runs.values() if r["corpus"] == "copy"]
    if copy_runs:
        out += [
            "## Synthetic copy corpus",
            "",
            "Validation perplexity against tokens (how fast each learns to copy):",
            "",
            "| run | " + " | ".join(f"{e['tokens']:,}" for e in copy_runs[0]["evals"]) + " |",
            "| --- |" + " ---: |" * len(copy_runs[0]["evals"]),
        ]
        for r in copy_runs:
            out.append(f"| {r['name']} | " + " | ".join(_fmt(e["val_ppl"]) for e in r["evals"]) + " |")
        out.append("")
    if dec.get("copy"):
        out += [
            f"CARD decoding of `{dec['copy']['model']}`, greedy, {dec['copy']['num_prompts']} prompts "
            "(a held-out document's first string and its period):",
            "",
        ]
        out += _decoding_table(dec["copy"]["rows"], None, dec["copy"].get("identical")) + [""]
    return "\n".join(out) + "\n"


def plots(out_dir: str, runs: dict[str, dict], summary: dict) -> list[str]:
    """perplexity.png, ablations.png, decoding.png, curve.png (those with data); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=100, format="png")
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs.values():
        if r["group"] == "efficiency" and r["evals"]:
            bound = " (bound)" if r["evals"][-1].get("val_ppl_is_bound") else ""
            ax.plot(
                [e["tokens"] for e in r["evals"]],
                [e["val_ppl"] for e in r["evals"]],
                "o-",
                ms=3,
                label=r["name"] + bound,
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    save(fig, "perplexity.png")

    variants = [v for v in summary["variants"] if v["objective"] == STUDIED and v["val_ppl"]]
    if variants:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for i, v in enumerate(variants):
            vals = [runs[n]["final"]["val_ppl"] for n in v["runs"] if runs[n]["final"]]
            left.scatter([i] * len(vals), vals, s=14)
            left.errorbar([i], [v["val_ppl"]["mean"]], fmt="k_", ms=14)
            acc = [runs[n]["final"].get("probe_acc_k1") for n in v["runs"] if runs[n]["final"]]
            acc = [a for a in acc if a is not None]
            if acc:
                right.scatter([i] * len(acc), acc, s=14)
        for a in (left, right):
            a.set_xticks(range(len(variants)))
            a.set_xticklabels([v["label"] for v in variants], rotation=40, ha="right", fontsize=7)
        left.set_ylabel("validation perplexity (each seed)")
        right.set_ylabel("probe accuracy after 1 mask")
        save(fig, "ablations.png")

    main = summary["decoding"].get("main")
    if main:
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in ("greedy", "sampled"):
            part = main.get(mode)
            if not part or part["rows"][0].get("judge_ppl") is None:
                continue
            rows = part["rows"]
            for K in sorted({r["window"] for r in rows[1:]}):
                rs = [r for r in rows[1:] if r["window"] == K]
                ax.plot(
                    [r["tokens_per_forward"] for r in rs],
                    [r["judge_ppl"] for r in rs],
                    "o-",
                    label=f"CARD {mode}, K={K}",
                )
            ax.scatter([1.0], [rows[0]["judge_ppl"]], marker="*", s=100, label=f"AR {mode}")
        ax.set_xlabel("tokens per forward pass")
        ax.set_ylabel("judge perplexity (ARM)")
        ax.legend(fontsize=7)
        save(fig, "decoding.png")

    curve = summary["decoding"].get("curve", {}).get("points")
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [c["tokens"] for c in curve],
            [(c.get("identical") or {}).get("tokens_per_forward", 1.0) for c in curve],
            "o-",
            label="tokens/forward, output identical to AR",
        )
        ax.plot(
            [c["tokens"] for c in curve],
            [1 + 7 * (c.get("probe_conf_k1") or 0) for c in curve],
            "s--",
            label="1 + 7 x probe conf (k=1)",
        )
        ax.set_xlabel("training tokens")
        ax.legend(fontsize=7)
        save(fig, "curve.png")
    return written


def write(out_dir: str, plan: Plan, meta: dict, runs: dict[str, dict], decoding: dict) -> dict:
    """Writes study.json, study.md and the plots (atomically); returns the summary."""
    summary = summarise(plan, runs, decoding)
    atomic_write(
        os.path.join(out_dir, "study.json"),
        json.dumps({"plan": plan.name, "meta": meta, "runs": runs, **summary}, indent=1, default=str),
    )
    plots(out_dir, runs, summary)
    atomic_write(os.path.join(out_dir, "study.md"), markdown(plan, meta, runs, summary))
    return summary
