"""Tune results: the trial a study chooses, and what the last worker writes.

Quality objective: the chosen trial is the one with the best validation quality (the data's routing
measure, `select.val_quality`), kept over the base trial (trial 0, the base configuration) only when the
choice holds out of fold: each of 10 folds of the validation prompts takes the trial (or the base) best on
the other nine, and those prompts' parts of the measure must route better than the base's in at least 90%
of paired bootstrap resamples (`select.out_of_fold_choice`, the cluster prior's rule; here on 1000
resamples). Differences of a few thousandths of APGR on a thousand prompts are noise; testing the top of
20 trials on the prompts that ranked it passes by luck (with 19 synthetic null trials, on 3 to 11 of 20
sets, by the noise's size; docs/experiments.md).
Pareto objective: the best validation quality on the front whose p99 is within `export.budget_ms`.

The last worker to finish writes `models/NAME/tuned.yaml` (the chosen configuration), plots and tables
under `models/NAME/tune/`, logs them to the study's MLflow run, and retrains the chosen trial into
`models/NAME/checkpoint`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from .common import console, model_dir, write_json
from .config import Config
from .select import MIN_WIN_RATE, measure, out_of_fold_choice, parts_win_rate
from .tune_space import apply

TRIAL_RESAMPLES = 1000  # paired bootstrap resamples of the val prompts behind a trial's win rate


@dataclass
class TuneResult:
    config: Config  # the base configuration with the chosen trial's values applied
    study: optuna.Study
    best_params: dict  # dotted config key -> value (searched and fixed)
    best_value: float | list[float] | None  # quality: the val routing measure; pareto: [quality, p99 ms]
    best_trial: int | None
    out_dir: Path


def choose(study: optuna.Study, pareto: bool, budget_ms: float, prep=None) -> optuna.trial.FrozenTrial | None:
    """Quality: the best trial that beats the base trial beyond validation noise (with `prep`), else the
    base trial. Pareto: the best quality on the front whose p99 is within budget (the fastest front
    trial, with a warning, when none is)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    if pareto:
        front = study.best_trials
        within = [t for t in front if t.values[1] <= budget_ms]
        if within:
            return max(within, key=lambda t: t.values[0])
        console.print(f"[yellow]tune: no candidate is within the {budget_ms:g} ms budget; choosing the fastest[/]")
        return min(front, key=lambda t: t.values[1])
    base = next((t for t in done if t.user_attrs.get("base")), None)
    if prep is None or base is None or "val_parts" not in base.user_attrs:
        return study.best_trial
    scored = [base, *(t for t in done if t.number != base.number and "val_parts" in t.user_attrs)]
    best = max(scored, key=lambda t: t.value)  # ties: the base
    if best.number == base.number:
        return base
    oof = out_of_fold_choice([np.asarray(t.user_attrs["val_parts"]) for t in scored], trial_quality(prep))
    win = trial_win_rate(prep, oof, base.user_attrs["val_parts"])
    if win >= MIN_WIN_RATE:
        return best
    console.print(f"[dim]tune: keeping the base trial {base.number} (val quality {base.value:.4f}): the best trial "
                  f"{best.number} ({best.value:.4f}), chosen out of fold, wins only {win:.1%} of bootstrap resamples[/]")
    return base


def trial_quality(prep):
    """quality(parts, positions): the routing measure of a trial's `val_parts` on those validation prompts."""
    return measure(prep, prep.rows("val"))


def trial_win_rate(prep, parts, base_parts, seed: int = 0) -> float:
    """Share of paired bootstrap resamples of the val prompts where `parts` route better than `base_parts`."""
    return parts_win_rate(trial_quality(prep), parts, base_parts, TRIAL_RESAMPLES, seed)


def finish(name: str, study: optuna.Study, cfg: Config, pareto: bool, prep, parent: str) -> TuneResult:
    """Write tuned.yaml, tables and plots, log them to the study's run, retrain the chosen trial.

    Left to the last worker: while other trials still run, this only returns the best so far."""
    import mlflow
    from mlflow import MlflowClient

    from .train import train

    out = model_dir(name) / "tune"
    best = choose(study, pareto, cfg.export.budget_ms, prep)
    if best is None:
        console.print("[yellow]tune: no completed trial yet; the configuration is unchanged[/]")
        return TuneResult(cfg, study, {}, None, None, out)
    params = dict(best.user_attrs.get("config", best.params))
    tuned = apply(cfg, params)
    value = list(best.values) if pareto else best.value
    result = TuneResult(tuned, study, params, value, best.number, out)
    others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if others:
        console.print(f"[dim]tune: {len(others)} trial(s) still running in other workers; the last one "
                      f"to finish writes the results[/]")
        return result
    out.mkdir(parents=True, exist_ok=True)
    (model_dir(name) / "tuned.yaml").write_text(yaml.safe_dump(tuned.to_dict(), sort_keys=False))
    files = write_tables(study, out, pareto, best, cfg.export.budget_ms)
    client = MlflowClient()
    client.log_metric(parent, "best_value", float(value[0] if pareto else value))
    for k, v in {"best_trial": best.number, **{f"best.{k}": v for k, v in params.items()}}.items():
        client.set_tag(parent, k, str(v))
    client.log_dict(parent, {"trial": best.number, "values": best.values, "config": params}, "best_params.json")
    for f in [*files, model_dir(name) / "tuned.yaml"]:
        client.log_artifact(parent, str(f), artifact_path="tune")
    _print_summary(study, best, params)
    console.print(f"[bold]retrain[/] trial {best.number}'s configuration into {model_dir(name) / 'checkpoint'}")
    # Training is deterministic, so a checkpoint with the same fingerprint already is this trial's model.
    with mlflow.start_run(run_id=parent, nested=mlflow.active_run() is not None):
        train(name, tuned, prep=prep)
    client.set_terminated(parent, "FINISHED")
    return result


def write_tables(study: optuna.Study, out: Path, pareto: bool, best, budget_ms: float) -> list[Path]:
    """trials.csv, history.png, importance.png (and pareto.md, pareto.png) under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    files = [out / "trials.csv"]
    study.trials_dataframe().to_csv(files[0], index=False)
    target = (lambda t: t.values[0]) if pareto else None
    label = study.user_attrs.get("measure", "val quality")
    plots = {"history.png": lambda: vis.plot_optimization_history(study, target=target, target_name=label),
             "importance.png": lambda: vis.plot_param_importances(study, target=target, target_name=label)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is "experimental" in Optuna
        for fname, plot in plots.items():
            try:
                ax = plot()
            except (ValueError, RuntimeError) as e:  # e.g. importance when no parameter varied
                console.print(f"[dim]tune: no {fname}: {e}[/]")
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            if fname == "history.png" and not pareto:  # the chosen trial need not be the best value
                ax.scatter([best.number], [best.value], marker="*", s=250, c="tab:red", zorder=3,
                           label=f"chosen (trial {best.number})")
                ax.legend(loc="upper left", bbox_to_anchor=(1.04, 1))
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=100)
            plt.close(fig)
            files.append(out / fname)
    if pareto:
        files += write_front(study, out, best, budget_ms, label)
    write_json(out / "summary.json", {"study": study.study_name, "best_trial": best.number,
                                      "best_values": best.values, "config": best.user_attrs.get("config"),
                                      "states": _states(study)})
    return files + [out / "summary.json"]


def write_front(study: optuna.Study, out: Path, chosen, budget_ms: float, label: str) -> list[Path]:
    """The Pareto front as a Markdown table and a scatter plot (all trials, front, budget, chosen)."""
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    keys = ["student.family", "student.dim", "student.layers", "student.max_tokens", "student.truncation"]
    lines = [f"| trial | {label} | p99 ms (cpu) | p99 ms (wall) | " + " | ".join(k.split(".")[1] for k in keys)
             + " | |", "|" + "---|" * (len(keys) + 5)]
    for t in front:
        cfg = t.user_attrs.get("config", t.params)
        mark = "chosen" if t.number == chosen.number else ("" if t.values[1] <= budget_ms else "over budget")
        lines.append(f"| {t.number} | {t.values[0]:.4f} | {t.values[1]:.3f} | "
                     f"{t.user_attrs.get('latency_p99_ms', float('nan')):.3f} | "
                     + " | ".join(str(cfg.get(k, "")) for k in keys) + f" | {mark} |")
    (out / "pareto.md").write_text(f"# Pareto front of {study.study_name}\n\nBudget: p99 <= {budget_ms:g} ms "
                                   f"(single int8 decisions, tokenization included). {len(done)} completed "
                                   f"trials, {len(front)} on the front.\n\n" + "\n".join(lines) + "\n")
    with plt.style.context("default"):  # Optuna's plots switch the global style
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], c="0.7", label="trials")
        ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="tab:blue", label="Pareto front")
        ax.scatter([chosen.values[1]], [chosen.values[0]], marker="*", s=250, c="tab:red", zorder=3, label="chosen")
        ax.axvline(budget_ms, ls="--", c="tab:red", lw=1, label=f"budget {budget_ms:g} ms")
        ax.set_xlabel("p99 decision latency, ms (cpu)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=100)
        plt.close(fig)
    return [out / "pareto.md", out / "pareto.png"]


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def _print_summary(study: optuna.Study, best, params: dict) -> None:
    from rich.table import Table

    table = Table(title=f"study {study.study_name}: " + ", ".join(f"{n} {s}" for s, n in _states(study).items()))
    for col in ("trial", "state", "value(s)", "epochs", "family", "dim", "max_tokens"):
        table.add_column(col, justify="right")
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get("config", t.params)
        vals = ", ".join(f"{v:.4f}" for v in t.values) if t.values else ""
        style = "bold green" if t.number == best.number else None
        table.add_row(str(t.number), t.state.name.lower(), vals, str(t.last_step + 1 if t.last_step is not None else ""),
                      str(cfg.get("student.family", "")), str(cfg.get("student.dim", "")),
                      str(cfg.get("student.max_tokens", "")), style=style)
    console.print(table)
    console.print(f"best: trial {best.number} " + " ".join(f"{k}={v}" for k, v in params.items()))
