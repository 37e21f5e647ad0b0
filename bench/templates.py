"""Templated prompts: does the varying middle of a prompt reach the router?

    python bench/templates.py --shared ../shared/data [--n 3000] [--seeds 1]

RouterBench-style few-shot prompts are built from routellm_mmlu.csv: per subject, five of its own
questions become shared examples ("The following are multiple choice questions ... about SUBJECT",
the shots, then the question and a closing instruction), so every prompt of a subject starts and ends
with the same long text and differs only in the middle. The same pipeline is trained with and without
`student.templates` (default config otherwise); the table gives test APGR, how many distinct routing
scores the test prompts get, and how far the calibrated strong shares land from their targets on test.
Writes bench/results/templates.md.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import load_config
from pipeline.data import prepare
from pipeline.evaluate import evaluate
from pipeline.export import export
from pipeline.ingest import ingest
from pipeline.label import label
from pipeline.metrics import apgr
from pipeline.module import pair_score
from pipeline.runtime import Router
from pipeline.train import load_trained, predict, train

HERE = Path(__file__).parent
CLOSE = "\nAnswer with the letter of the correct option only (A, B, C or D), without explanation.\nAnswer:"


def templated(shared: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """n few-shot prompts from routellm_mmlu.csv; the shots of each subject are five of its questions."""
    df = pd.read_csv(shared / "routellm_mmlu.csv")
    rng = np.random.default_rng(seed)
    rows = []
    for subject, group in df.groupby("subject"):
        group = group.sample(frac=1.0, random_state=int(rng.integers(1 << 31)))
        shots, rest = group.iloc[:5], group.iloc[5:]
        head = (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
                + "\n\n".join(q.removesuffix("Answer:").rstrip() + "\nAnswer: A" for q in shots.prompt) + "\n\n")
        for _, r in rest.iterrows():
            rows.append({**r.to_dict(), "prompt": head + r.prompt.removesuffix("Answer:").rstrip() + CLOSE})
    out = pd.DataFrame(rows).sample(n=min(n, len(rows)), random_state=seed)
    return out.reset_index(drop=True)


def run_arm(file: Path, templates: bool, seed: int) -> dict:
    name = f"bench_templated_{'on' if templates else 'off'}" + (f"_seed{seed}" if seed else "")
    cfg = load_config(overrides=[f"student.templates={str(templates).lower()}", f"train.seed={seed}"])
    ingest(str(file), name=name)
    label(name, cfg.label)
    train(name, cfg, force=True)
    result = evaluate(name)
    trained = load_trained(name)
    prep = prepare(name, load_config(base=trained.meta["config"]))
    test = prep.rows("test")
    score = pair_score(predict(trained.student, prep, load_config(base=trained.meta["config"]), test), prep.pair)
    thresholds = trained.meta["decision"]["thresholds"]
    realised = {k: float(np.mean(score >= t)) for k, t in thresholds.items()}
    templates_found = (trained.meta["tokenizer"].get("templates") or {})
    served = served_apgr(name, [prep.prompts[i] for i in test], prep.target[test], prep.pair) if templates else {}
    return {**served, "templates": templates, "seed": seed, "apgr": result["routers"]["router (student)"]["apgr"],
            "teacher": result["routers"]["teacher"]["apgr"], "tfidf_lr": result["routers"]["tfidf_lr"]["apgr"],
            "distinct_scores": int(len(np.unique(np.round(score, 6)))), "n_test": int(len(test)),
            "max_share_error": max(abs(v - float(k)) for k, v in realised.items()),
            "unreachable": trained.meta["decision"].get("unreachable_fractions", {}),
            "n_prefixes": len(templates_found.get("prefixes", [])), "n_suffixes": len(templates_found.get("suffixes", []))}


def client_form(prompt: str) -> str:
    """The prompt as a client may send it: Windows line breaks and a trailing newline."""
    return prompt.replace("\n", "\r\n") + "\r\n"


def served_apgr(name: str, prompts: list[str], target: np.ndarray, pair: tuple[int, int]) -> dict:
    """Test APGR of the exported bundle (int8) on the prompts as they are, as `client_form` sends them,
    and as it sends them under the exact template matching of templates version 1."""
    r = Router.load(export(name))
    weak, strong = target[:, pair[0]], target[:, pair[1]]
    out = {"served": apgr(r.routing_score(r.scores(prompts)), weak, strong)}
    client = [client_form(p) for p in prompts]
    out["served_client"] = apgr(r.routing_score(r.scores(client)), weak, strong)
    r.spec = {**r.spec, "templates": {k: v for k, v in r.spec["templates"].items() if k != "version"}}
    out["served_client_v1"] = apgr(r.routing_score(r.scores(client)), weak, strong)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    file = out_dir / "templated_mmlu.csv"
    data = templated(args.shared, args.n)
    data.to_csv(file, index=False)
    results = [run_arm(file, on, seed) for seed in range(args.seeds) for on in (False, True)]
    lengths = data.prompt.str.len()
    lines = ["# Templated prompts (few-shot MMLU built from routellm_mmlu.csv)", "",
             f"{len(data)} prompts, median {int(lengths.median())} characters (the question is in the middle); "
             f"default config except `student.templates`; machine: {platform.machine()}, {platform.system()}.", "",
             "| templates | seed | student APGR | teacher APGR | TF-IDF+LR | distinct test scores | "
             "max share error on test | unreachable shares (validation) | prefixes / suffixes learned |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        lines.append(f"| {'on' if r['templates'] else 'off'} | {r['seed']} | {r['apgr']:.3f} | {r['teacher']:.3f} | "
                     f"{r['tfidf_lr']:.3f} | {r['distinct_scores']} / {r['n_test']} | {r['max_share_error']:.3f} | "
                     f"{', '.join(r['unreachable']) or '-'} | {r['n_prefixes']} / {r['n_suffixes']} |")
    lines += ["", "The bundle as served (int8, `Router`), test APGR with templates on: prompts as they are, as a "
              "client sends them (Windows line breaks and a trailing newline), and so sent under templates "
              "version 1 (exact matching, before `template_edges`):", "",
              "| seed | as they are | client form | client form, version 1 matching |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['served']:.3f} | {r['served_client']:.3f} | {r['served_client_v1']:.3f} |"
              for r in results if r["templates"]]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "templates.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "templates.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
