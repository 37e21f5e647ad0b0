"""Tuning benchmark: a pruned Optuna study on MMLU against the untuned default, on this machine.

    python bench/tune.py --shared ../shared/data [--trials 20] [--minutes 30] [--config pipeline/configs/mmlu.yaml]

MMLU is ingested and labeled as `bench_tune_mmlu` in the default data dir, so the cached teacher
embeddings are reused; models, the MLflow store and the study journal go to bench/out/tune/ (started
fresh). The untuned default (the config file, by default MMLU's own) is trained first; then the study runs (median pruning; static students,
since one transformer epoch on MMLU takes minutes on 2 CPU cores) and retrains its chosen trial; both
are compared on the fixed test split. Goal: >= 20 trials within the time budget, and a tuned test APGR
at least the default's. Writes bench/results/tune.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "out" / "tune"
NAME = "bench_tune_mmlu"
# The default space, narrowed to what fits the time budget on a 2-core CPU machine.
SPACE = {
    "student.family": "static",
    "student.dim": [128, 256],
    "student.max_tokens": [64, 128, 256],
    "train.batch_size": [64, 128, 256],
    "train.max_epochs": [4, 20],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=30.0, help="budget for the whole tune stage")
    ap.add_argument("--config", type=Path, default=HERE.parent / "pipeline" / "configs" / "mmlu.yaml",
                    help="the untuned default, and the base of every trial")
    args = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    os.environ.update(PREROUTER_MODELS_DIR=str(OUT / "models"), PREROUTER_MLRUNS_DIR=str(OUT / "mlruns"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import torch

    from pipeline.common import model_dir, read_json
    from pipeline.config import load_config
    from pipeline.ingest import ingest
    from pipeline.label import label
    from pipeline.train import train
    from pipeline.tune import tune

    ingest(str(args.shared / "routellm_mmlu.csv"), name=NAME)
    label(NAME)
    checkpoint = model_dir(NAME) / "checkpoint"

    t0 = time.perf_counter()
    train(NAME, load_config(args.config), force=True)
    default = {"seconds": time.perf_counter() - t0, **read_json(checkpoint / "meta.json")["metrics"]}

    cfg = load_config(args.config, base={"tune": {"space": SPACE, "pruner": "median"}})
    t0 = time.perf_counter()
    # Stop starting trials with ~4 minutes left for the retrain of the chosen trial.
    result = tune(NAME, cfg, trials=args.trials, timeout=max(60.0, (args.minutes - 4) * 60))
    seconds = time.perf_counter() - t0
    tuned = read_json(checkpoint / "meta.json")
    assert tuned["config"] == result.config.to_dict(), "the checkpoint is not the chosen trial"
    t0 = time.perf_counter()
    top = top_trials_on_test(result, cfg)
    print(f"top trials refitted and tested in {time.perf_counter() - t0:.0f} s")
    write(result, default, tuned["metrics"], seconds, args, torch.get_num_threads(), top)


def top_trials_on_test(result, cfg, k: int = 5) -> list[tuple]:
    """(trial, val APGR, test APGR) for the base trial and the k best by validation, refitted outside the
    study (training is deterministic, so these are the study's models): how well val APGR predicts test."""
    import tempfile

    from optuna.trial import TrialState

    from pipeline.data import prepare
    from pipeline.train import fit_student, predict, split_metrics
    from pipeline.tune import fit_teacher_once
    from pipeline.tune_space import apply

    done = result.study.get_trials(states=(TrialState.COMPLETE,))
    chosen = sorted(done, key=lambda t: -t.value)[:k]
    chosen += [t for t in done if t.user_attrs.get("base") and t not in chosen]
    prep, teachers, rows = prepare(NAME, cfg), {}, []
    for t in chosen:
        tcfg = apply(cfg, t.user_attrs["config"])
        fit_teacher_once(prep, tcfg, teachers)
        with tempfile.TemporaryDirectory() as work:
            net, _ = fit_student(prep, tcfg, Path(work))
        test = prep.rows("test")
        rows.append((t, t.value, split_metrics(prep, predict(net, prep, tcfg, test), test)["apgr"]))
    return rows


def write(result, default: dict, tuned: dict, seconds: float, args, threads: int, top: list[tuple]) -> None:
    from optuna.trial import TrialState

    study = result.study
    trials = study.get_trials(deepcopy=False)
    states = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete]
    study_start = min(t.datetime_start for t in trials)
    study_end = max(t.datetime_complete for t in trials if t.datetime_complete)
    met_trials = finished >= args.trials and seconds <= args.minutes * 60
    met_quality = tuned["test"]["apgr"] >= default["test"]["apgr"]
    lines = [
        "# Tuning on MMLU",
        "",
        f"Generated by `python bench/tune.py` on {platform.platform()}, {threads} threads; a shared 2-core "
        "machine, so wall times include other processes' load. Untuned default: `pipeline/configs/default.yaml` "
        f"then `{args.config.relative_to(HERE.parent) if args.config.is_relative_to(HERE.parent) else args.config}` "
        "(static student), also the base of every trial. Study: `prerouter tune` with TPE, median pruning (per-epoch validation APGR), trial 0 = "
        "the default, and the default search space narrowed to",
        "",
        "```yaml",
        *[f"{k}: {v}" for k, v in SPACE.items()],
        "```",
        "",
        "(static students only: one transformer epoch on MMLU takes minutes on 2 CPU cores). Validation: the "
        "1,072 val prompts of the train side; test: the fixed split of `../shared/data/README.md` (2,785 prompts), "
        "never seen by the study.",
        "",
        "## Result",
        "",
        "| | value | goal | met |",
        "|---|---:|---:|---|",
        f"| trials finished (complete + pruned) | {finished} | ≥ {args.trials} | {'yes' if finished >= args.trials else '**no**'} |",
        f"| pruned | {states[TrialState.PRUNED]} | | |",
        f"| failed | {states[TrialState.FAIL]} | | |",
        f"| tune stage wall time (teacher head, trials, retrain) | {seconds / 60:.1f} min | ≤ {args.minutes:g} min | "
        f"{'yes' if seconds <= args.minutes * 60 else '**no**'} |",
        f"| of which trials (first start to last end) | {(study_end - study_start).total_seconds() / 60:.1f} min | | |",
        f"| mean trial time (complete / pruned) | {_mean(trials, TrialState.COMPLETE):.0f} s / "
        f"{_mean(trials, TrialState.PRUNED):.0f} s | | |",
        f"| chosen trial | {result.best_trial} (val APGR {result.best_value:.4f}) | | |",
        f"| test APGR, tuned (retrained chosen trial) | {tuned['test']['apgr']:.4f} | ≥ default | "
        f"{'yes' if met_quality else '**no**'} |",
        f"| test APGR, untuned default | {default['test']['apgr']:.4f} | | |",
        f"| val APGR, tuned / default | {tuned['val']['apgr']:.4f} / {default['val']['apgr']:.4f} | | |",
        f"| CPT(50%) test, tuned / default | {tuned['test']['cpt50']:.3f} / {default['test']['cpt50']:.3f} | | |",
        f"| default training time | {default['seconds']:.0f} s | | |",
        "",
        f"Overall: {'both goals met' if met_trials and met_quality else 'goal missed (see above)'}. "
        f"Total trial time {sum(durations) / 60:.1f} min.",
        "",
        "## Validation vs test APGR",
        "",
        "The five best trials by validation APGR and the base trial (the default configuration), refitted "
        "after the study and scored on the test split. The chosen trial is the best on validation when the "
        "choice holds out of fold (each of 10 validation folds scored by the trial best on the other nine; "
        "those scores beat the base trial in at least 90% of paired bootstrap resamples), else the base trial.",
        "",
        "| trial | val APGR | test APGR | |",
        "|---:|---:|---:|---|",
        *[f"| {t.number} | {val:.4f} | {test:.4f} | "
          + ", ".join(x for x in ("base" if t.user_attrs.get("base") else "",
                                  "chosen" if t.number == result.best_trial else "") if x) + " |"
          for t, val, test in top],
        "",
        "## Chosen configuration",
        "",
        "```yaml",
        *[f"{k}: {v}" for k, v in result.best_params.items()],
        "```",
        "",
        "## Trials",
        "",
        "| trial | state | epochs | val APGR | s | dim | max_tokens | truncation | batch | lr | distill | dropout |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for t in trials:
        c = t.user_attrs.get("config", {})
        value = t.value if t.state == TrialState.COMPLETE else (t.intermediate_values.get(t.last_step) if t.last_step is not None else None)
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else float("nan")
        lines.append(
            f"| {t.number} | {t.state.name.lower()} | {'' if t.last_step is None else t.last_step + 1} | "
            f"{'' if value is None else f'{value:.4f}'} | {secs:.0f} | {c.get('student.dim', '')} | "
            f"{c.get('student.max_tokens', '')} | {c.get('student.truncation', '')} | {c.get('train.batch_size', '')} | "
            f"{c.get('train.lr', 0):.2e} | {c.get('train.distill_weight', 0):.2f} | {c.get('student.dropout', 0):.2f} |")
    lines += ["", "Pruned rows show the last reported validation APGR. Plots and tables of the study: "
              "`bench/out/tune/models/bench_tune_mmlu/tune/` (history.png, importance.png, trials.csv)."]
    (HERE / "results").mkdir(parents=True, exist_ok=True)
    (HERE / "results" / "tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _mean(trials, state) -> float:
    d = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.state == state]
    return sum(d) / len(d) if d else float("nan")


if __name__ == "__main__":
    main()
