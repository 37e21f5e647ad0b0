"""Quality benchmark: train on the train split of each real file, report the fixed test split.

    python bench/quality.py --shared ../shared/data [--students static,transformer] [--only mmlu] [--seeds 5]
                            [--out DIR]
    python bench/quality.py --render [--out DIR]   # rewrite quality.md from quality.json, no training

Writes DIR/quality.md and DIR/quality.json (default bench/results, committed), and, with the default DIR,
rewrites the tables between the README's two `bench/quality.py` markers from the same results. Every goal is judged on
the default configuration and on the mean over the seeds, against the best simple baseline plus
MARGIN, so that a win is one that transfers rather than one a per-dataset config bought:
- weak -> strong pairs (MMLU, GSM8K, MT-Bench): student APGR >= best of TF-IDF+LR, kNN, MF and the
  cluster router + MARGIN; MMLU and GSM8K also keep their absolute goals (0.70, 0.67);
- N models (RouterDC, 7 models, no costs): mean outcome of the routed model >= best of the best single
  model, TF-IDF + ridge and the cluster router + MARGIN;
- pairwise (AlpacaEval): per-battle win accuracy >= best of the global Bradley-Terry ranking and the
  TF-IDF + ridge, kNN and cluster routers' win rates + MARGIN (discordant battles vs BT also shown).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.common import model_dir, read_json
from pipeline.config import load_config
from pipeline.evaluate import evaluate
from pipeline.ingest import ingest
from pipeline.label import label

CONFIGS = Path(__file__).parent.parent / "pipeline" / "configs"
FILES = {  # key: (file, what the goal judges, absolute APGR goal, config file in pipeline/configs or None)
    "mmlu": ("routellm_mmlu.csv", "apgr", 0.70, None),
    "gsm8k": ("routellm_gsm8k.csv", "apgr", 0.67, None),
    "mtbench": ("routellm_mtbench.jsonl", "apgr", None, None),
    "alpacaeval": ("alpacaeval_pairwise.parquet", "win", None, None),
    "routerdc": ("routerdc_7models.csv", "multi", None, None),
}
MARGIN = 0.02
BASELINES = {  # the baselines each kind of goal must beat by MARGIN
    "apgr": ("tfidf_lr", "knn", "mf", "cluster"),
    "multi": ("best_single", "tfidf_ridge", "cluster"),
    "win": ("bradley_terry", "tfidf_ridge", "knn", "cluster"),
}
STUDENTS = {
    "static": ["student.family=static"],
    # ~1 min per MMLU epoch on 2 cores; one member (it is over the latency budget with one already)
    "transformer": ["student.family=transformer", "student.dim=128", "student.layers=2", "student.heads=4",
                    "student.max_tokens=128", "train.max_epochs=8", "student.members=1"],
}
HERE = Path(__file__).parent


def run_one(shared: Path, key: str, student: str, extra: list[str] = (), seeds: int = 1) -> dict:
    """Train and evaluate with seeds 0..seeds-1; the row is seed 0's, with every seed's numbers beside it."""
    from pipeline.data import prepare
    from pipeline.train import train

    file, kind, goal, config = FILES[key]
    runs = []
    for seed in range(seeds):
        name = f"bench_{key}_{student}" + (f"_seed{seed}" if seed else "")
        cfg = load_config(config and CONFIGS / config, overrides=STUDENTS[student] + list(extra) + [f"train.seed={seed}"])
        ingest(str(shared / file), name=name)
        label(name, cfg.label)
        prep = prepare(name, cfg)  # untimed: teacher embeddings are computed here when not yet cached
        t0 = time.perf_counter()
        train(name, cfg, prep=prep, force=True)  # timed: teacher head + student, never a skipped stage
        seconds = time.perf_counter() - t0
        chosen = (read_json(model_dir(name) / "checkpoint" / "meta.json").get("selection") or {})
        runs.append(evaluate(name) | {"train_seconds": round(seconds, 1), "chosen": {
            "group_by": chosen.get("group_by"), "cluster_prior": (chosen.get("cluster_prior") or {}).get("chosen")}})
    result = runs[0] | {"dataset": key, "student": student, "kind": kind, "goal": goal, "config": config,
                        "overrides": list(extra)}
    result["seed_chosen"] = [r["chosen"] for r in runs]
    if "routers" in result:
        result["seed_apgr"] = [_router(r["routers"])["apgr"] for r in runs]
    if "win_accuracy" in result:
        result["seed_win_accuracy"] = [_router(r["win_accuracy"]) for r in runs]
    if "multi" in result:
        result["seed_multi"] = [_router(r["multi"]["quality"]) for r in runs]
    return result


def _kind(r: dict) -> str:
    """What the row's goal judges (rows written before the field existed: from FILES)."""
    return r.get("kind") or FILES[r["dataset"]][1]


def _values(r: dict, kind: str) -> tuple[dict, list[float]]:
    """The row's routers' numbers for a goal kind (name -> value) and the student's over seeds."""
    if kind == "apgr":
        values, seeds = {k: v["apgr"] for k, v in r["routers"].items()}, r.get("seed_apgr")
    elif kind == "multi":
        values, seeds = r["multi"]["quality"], r.get("seed_multi")
    else:
        values, seeds = r["win_accuracy"], r.get("seed_win_accuracy")
    return values, list(seeds or [_router(values)])


def baselines_of(r: dict, kind: str) -> dict[str, float]:
    """The row's baselines for a goal kind that it holds a number for (name -> value), in BASELINES order."""
    values = _values(r, kind)[0]
    return {k: values[k] for k in BASELINES[kind] if values.get(k) is not None and np.isfinite(values[k])}


def best_baseline(r: dict, kind: str) -> tuple[str, float] | None:
    """(name, value) of the best of the row's baselines for a goal kind; None without any."""
    found = baselines_of(r, kind)
    return max(found.items(), key=lambda kv: kv[1]) if found else None


def baseline_goal(r: dict, kind: str) -> tuple[float, bool] | None:
    """(best baseline + MARGIN, whether the student's mean over seeds reaches it) for the row's goal
    kind; None when the row is not judged on that kind or holds none of its baselines."""
    best = best_baseline(r, kind) if _kind(r) == kind else None
    if best is None:
        return None
    target = best[1] + MARGIN
    return target, bool(np.mean(_values(r, kind)[1]) >= target - 1e-12)


def absolute_goal(r: dict) -> tuple[float, bool] | None:
    """(the row's absolute APGR goal, whether the student's mean over seeds reaches it); None without one."""
    if r.get("goal") is None or _kind(r) != "apgr":
        return None
    return r["goal"], bool(np.mean(_values(r, "apgr")[1]) >= r["goal"])


def _goal_cells(judged: tuple[float, bool] | None, digits: int = 3) -> str:
    """'≥ 0.675 | yes' for a goal and whether it is met, '- | -' without one."""
    if judged is None:
        return "- | -"
    return f"≥ {judged[0]:.{digits}f} | {'yes' if judged[1] else '**no**'}"


def _router(by_name: dict):
    return next(v for k, v in by_name.items() if k.startswith("router"))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _config(r: dict) -> str:
    """The config, then what the pipeline chose per seed (group column; cluster prior k/β)."""
    chosen = []
    for c in r.get("seed_chosen", []):
        prior = c.get("cluster_prior")
        chosen.append(f"{c.get('group_by') or '-'}/" + (f"k{prior['k']} β{prior['beta']}" if prior else "-"))
    return " ".join([r.get("config") or "default"] + [f"`{o}`" for o in r.get("overrides", [])]
                    + ([f"(chosen: {', '.join(chosen)})"] if chosen else []))


def _vs_bt(w: dict) -> str:
    """Discordant battles of the student (seed 0) and Bradley-Terry, and the exact McNemar p-value."""
    from scipy.stats import binomtest

    if not w.get("vs_bradley_terry"):  # results written before the count existed
        return "- | -"
    better, worse = _router(w["vs_bradley_terry"])
    p = binomtest(better, better + worse).pvalue if better + worse else 1.0
    return f"{better} / {worse} | {p:.2f}"


def _spread(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return "- (1)"
    return f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}] ({len(values)})"


def _pair_lines(results: list[dict]) -> list[str]:
    lines = ["## Weak → strong pairs: APGR (higher is better; random ≈ 0.50)", "",
             f"Goals: the absolute one where set, and best of TF-IDF+LR, kNN, MF, cluster + {MARGIN}; both on the "
             "mean over seeds.", "",
             "| dataset | student | config | student APGR | over seeds: mean [min, max] (n) | teacher APGR | "
             "TF-IDF+LR | kNN | MF | cluster | length | random | oracle | goal | met | goal: best baseline + margin | met | "
             "CPT(50%) | CPT(80%) | train s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    for r in results:
        if "routers" not in r:
            continue
        R = r["routers"]
        student = _router(R)
        seeds = r.get("seed_apgr", [student["apgr"]])
        absolute = absolute_goal(r)
        apgr = {k: _fmt(R.get(k, {}).get("apgr")) for k in ("teacher", "tfidf_lr", "knn", "mf", "cluster", "length",
                                                             "random", "oracle")}
        lines.append(
            f"| {r['dataset']} ({r['pair']['n']} prompts) | {r['student']} | {_config(r)} | {_fmt(student['apgr'])} | "
            f"{_spread(seeds)} | " + " | ".join(apgr.values()) + f" | {_goal_cells(absolute, 2)} | "
            f"{_goal_cells(baseline_goal(r, 'apgr'))} | {_fmt(student['cpt50'])} | {_fmt(student['cpt80'])} | "
            f"{r['train_seconds']} |")
    return lines


def _multi_lines(results: list[dict]) -> list[str]:
    rows = [r for r in results if "multi" in r]
    if not rows:
        return []
    lines = ["", "## N models: mean outcome of the routed model on test prompts (argmax over observed models)", "",
             "`gap closed` = (student − best single) / (oracle − best single). Goal: best of best single, TF-IDF + "
             f"ridge, cluster + {MARGIN}, on the mean over seeds.", "",
             "| dataset | student | config | prompts | models | student | over seeds: mean [min, max] (n) | teacher | "
             "best single | TF-IDF + ridge | kNN | cluster | oracle | gap closed | goal | met |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m = r["multi"]
        q = m["quality"]
        seeds = r.get("seed_multi", [_router(q)])
        cells = [_fmt(q.get(k)) for k in ("teacher", "best_single", "tfidf_ridge", "knn", "cluster", "oracle")]
        lines.append(f"| {r['dataset']} | {r['student']} | {_config(r)} | {m['n']} | {m['n_models']} | "
                     f"{_fmt(_router(q))} | {_spread(seeds)} | " + " | ".join(cells) +
                     f" | {_fmt(_router(m['gap_closed']))} | {_goal_cells(baseline_goal(r, 'multi'))} |")
    return lines


def _win_lines(results: list[dict]) -> list[str]:
    rows = [r for r in results if "win_accuracy" in r]
    if not rows:
        return []
    lines = ["", "## Pairwise: per-battle win prediction on test prompts (ties excluded)", "",
             "Baselines' win probabilities come from their per-model win rates, read like the student's; the global "
             "Bradley–Terry ranking is fitted on the train battles. Goal: best "
             f"of global Bradley–Terry, TF-IDF + ridge, kNN, cluster + {MARGIN}, on the mean over seeds.", "",
             "| dataset | student | config | battles | student | over seeds: mean [min, max] (n) | teacher | "
             "global Bradley–Terry | TF-IDF + ridge | kNN | cluster | student right / wrong where BT is not | "
             "McNemar p | above BT (mean) | goal | met |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    f4 = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731  (differences of a few battles in 8,000)
    for r in rows:
        w = r["win_accuracy"]
        student = _router(w)
        seeds = r.get("seed_win_accuracy", [student])
        cells = [f4(w.get(k)) for k in ("teacher", "bradley_terry", "tfidf_ridge", "knn", "cluster")]
        lines.append(f"| {r['dataset']} | {r['student']} | {_config(r)} | {w['n_battles']} | {f4(student)} | "
                     f"{_spread(seeds, 4)} | " + " | ".join(cells) + f" | {_vs_bt(w)} | "
                     f"{'yes' if np.mean(seeds) > w['bradley_terry'] else '**no**'} | "
                     f"{_goal_cells(baseline_goal(r, 'win'), 4)} |")
    return lines


def write(results: list[dict], path: Path) -> None:
    lines = [
        "# Quality on the fixed test split",
        "",
        f"Generated by `python bench/quality.py` on {platform.platform()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Train split only for training; the split rule is the one in "
        "`../shared/data/README.md`. Config: `pipeline/configs/default.yaml` for every dataset (the static student: "
        f"{load_config().student.members} members averaged), then the student family (the transformer: 2 layers, "
        "128 wide, one member) and any overrides listed in the `config` column, then what the pipeline chose for each seed "
        "(`group column/cluster prior`, `-` for none: the group by cross-validation over train + validation, the prior "
        "on validation). Baselines are fitted on the same train split.",
        "`train s` is the train stage of seed 0 (teacher head + student, on prepared data: the teacher's embeddings "
        "are computed before the clock starts) on this shared 2-core machine.",
        "",
    ]
    lines += _goal_lines(results) + _pair_lines(results) + _multi_lines(results) + _win_lines(results)
    if plot(results, path.with_suffix(".png")):
        lines += ["", f"![student against the baselines of each goal]({path.with_suffix('.png').name})"]
    path.write_text("\n".join(lines) + "\n")


MEASURE = {"apgr": "APGR", "multi": "routed mean outcome", "win": "win prediction"}


def _goal_lines(results: list[dict]) -> list[str]:
    """One line per goal of the shipped (static) student, judged on its mean over seeds, as the tables below."""
    lines = []
    for r in results:
        if r.get("student") != "static":
            continue
        kind = _kind(r)
        values, seeds = _values(r, kind)
        digits = 4 if kind == "win" else 3
        mean = f"{np.mean(seeds):.{digits}f} (mean of {len(seeds)})"
        if (absolute := absolute_goal(r)) is not None:
            lines.append(f"| {r['dataset']} | {MEASURE[kind]} ≥ {absolute[0]:.2f} | {mean} | "
                         f"{'yes' if absolute[1] else '**no**'} |")
        judged, best = baseline_goal(r, kind), best_baseline(r, kind)
        if judged is not None:
            lines.append(f"| {r['dataset']} | {MEASURE[kind]} ≥ best baseline ({best[0]} {best[1]:.{digits}f}) + "
                         f"{MARGIN} = {judged[0]:.{digits}f} | {mean} | {'yes' if judged[1] else '**no**'} |")
    if not lines:
        return []
    missed = sum("**no**" in line for line in lines)
    return ["## Goals (the shipped static student, default config)", "",
            "| dataset | goal | student | met |", "|---|---|---:|---|", *lines, "",
            f"{len(lines) - missed} of {len(lines)} met. What was tried for the missed ones, with what it measured on "
            "validation, is in `docs/experiments.md`.", ""]


def plot(results: list[dict], path: Path) -> bool:
    """One panel per dataset of the shipped student: its mean over seeds (the error bar spans the seeds'
    range; green when every goal of the row is met), each baseline of its goal, and the goals as lines
    (best baseline + MARGIN dashed, an absolute goal dotted).
    False when no row of the static student is there to draw."""
    rows = [r for r in results if r.get("student") == "static" and baseline_goal(r, _kind(r)) is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        kind = _kind(r)
        seeds = _values(r, kind)[1]
        baselines = baselines_of(r, kind)
        names = list(baselines)
        heights = [float(np.mean(seeds))] + list(baselines.values())
        target, met = baseline_goal(r, kind)
        absolute = absolute_goal(r)
        met = met and (absolute is None or absolute[1])  # green only when every goal of the row is met
        colors = ["tab:green" if met else "tab:red"] + ["tab:gray"] * len(names)
        ax.bar(range(len(heights)), heights, color=colors,
               yerr=[[heights[0] - min(seeds)] + [0] * len(names), [max(seeds) - heights[0]] + [0] * len(names)])
        ax.axhline(target, ls="--", color="k", lw=1, label=f"goal {target:.3f}")
        if absolute is not None:
            ax.axhline(absolute[0], ls=":", color="tab:blue", lw=1, label=f"absolute {absolute[0]:.2f}")
        ax.set_xticks(range(len(heights)), ["student"] + names, rotation=45, ha="right", fontsize=8)
        low = min(heights + [target]) - 0.05
        ax.set_ylim(max(0.0, low), max(heights + [target]) + 0.06)  # room for the legend above the bars
        ax.set_title(f"{r['dataset']}: {MEASURE[kind]}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


README = HERE.parent / "README.md"
BEGIN = "<!-- tables written by bench/quality.py from bench/results/quality.json: edit that script, not these lines -->"
END = "<!-- end of the tables written by bench/quality.py -->"


def readme_block(results: list[dict]) -> str:
    """quality.md's tables, each under a one-line caption: what the README shows between its markers."""
    sections = [
        ("The goals, for the shipped static student (judged on the mean over seeds):", _goal_lines(results)),
        ("Weak → strong pairs, APGR (higher is better; random ≈ 0.50):", _pair_lines(results)),
        ("N models, mean outcome of the model each test prompt is routed to (argmax over its observed models):",
         _multi_lines(results)),
        ("Pairwise, per-battle win prediction on test prompts (ties excluded); the student's is the bundle's own "
         "sigmoid(logit_a − logit_b) (`Router.win_probability`), exactly what a service gets:", _win_lines(results)),
    ]
    lines = []
    for caption, section in sections:
        table = [line for line in section if line.startswith("|")]
        if table:
            lines += [caption, "", *table, ""]
    return "\n".join(lines)


def update_readme(results: list[dict], path: Path = README) -> None:
    """Replace what stands between BEGIN and END in `path` with `readme_block(results)`; the rest is kept."""
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: needs one line {BEGIN!r} and, after it, one line {END!r}")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    path.write_text(f"{head}{BEGIN}\n\n{readme_block(results)}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--students", default="static,transformer")
    ap.add_argument("--only", default=",".join(FILES))
    ap.add_argument("--seeds", type=int, default=1, help="train seeds 0..N-1; goals are judged on their mean")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides (section.key=value)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder of quality.md and quality.json")
    ap.add_argument("--render", action="store_true", help="only rewrite quality.md from quality.json (no training)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="README whose marked tables are rewritten (default: the project's, when --out is bench/results)")
    args = ap.parse_args()
    readme = args.readme or (README if args.out.resolve() == (HERE / "results").resolve() else None)
    if args.render:
        results = json.loads((args.out / "quality.json").read_text())
        write(results, args.out / "quality.md")
        if readme:
            update_readme(results, readme)
        print((args.out / "quality.md").read_text())
        return
    if not args.shared.is_dir():
        raise SystemExit(f"{args.shared} not found: the benchmark needs the real data files")
    unknown = set(args.only.split(",")) - set(FILES)
    if unknown:
        raise SystemExit(f"--only: unknown datasets {sorted(unknown)} (known: {', '.join(FILES)})")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (out / "quality.json").is_file():  # keep rows of datasets/students not rerun this time
        previous = {(r["dataset"], r["student"]): r for r in json.loads((out / "quality.json").read_text())}
    for key in args.only.split(","):
        for student in args.students.split(","):
            previous[(key, student)] = run_one(args.shared, key, student, args.set, args.seeds)
            results = [previous[k] for k in sorted(previous, key=lambda k: (list(FILES).index(k[0]), k[1]))]
            (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
            write(results, out / "quality.md")
            if readme:
                update_readme(results, readme)
    print((out / "quality.md").read_text())


if __name__ == "__main__":
    main()
