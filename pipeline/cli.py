"""`prerouter` command line: parses arguments and calls one stage function per subcommand.

Stage modules are imported inside each command so that `prerouter route` never pays for torch.
"""
from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import PrerouterError, console

app = typer.Typer(
    name="prerouter",
    help="Train a compact pre-generation LLM router from preference data and ship it as an ONNX bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SplitColumnOpt = typer.Option(None, "--split-column", help="Column whose train / val / test values are the split "
                                                             "(instead of the prompt-hash rule).")
TestDataOpt = typer.Option(None, "--test-data", help="A second file, same layout and models, whose prompts are the "
                                                     "test split; the main file's are split into train/val.")
LayoutOpt = typer.Option(None, "--layout", help="pairwise | wide | long; detected from the columns when omitted.")
ModelsOpt = typer.Option(None, "--models", help="Wide layout: comma-separated model columns to use.")
RenameOpt = typer.Option(None, "--rename", help="Comma-separated OLD=NEW column renames applied as a data file is "
                                                "read (e.g. question=prompt,model_name=model,label=score).")
PromptsOpt = typer.Option(None, "--prompts", help="A file of the prompts the data names by a key (the one column "
                                                  "both share, e.g. question_id): its `prompt`, or its `turns` "
                                                  "(a row's first `turn` of them), e.g. MT-Bench's question.jsonl.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see pipeline/configs/default.yaml).")
# The routing settings `route` and `score` take (Router.check_settings says which a bundle uses).
StrongFractionOpt = typer.Option(None, min=0.0, max=1.0, help="Pair: target share of strong calls.")
ThresholdOpt = typer.Option(None, help="Pair: raw score threshold instead of a fraction.")
CostWeightOpt = typer.Option(None, help="N models: λ in argmax p - λ·cost.")
OverrideArg = typer.Option(None, "--set", "-s", help="Config override section.key=value; repeatable.")


def _writable(path: Optional[Path], kind: str = "dir", option: str = "--out") -> None:
    """A one-line error before any work when `path` cannot be written (see common.check_output_path)."""
    from .common import check_output_path

    if path is not None:
        check_output_path(path, kind, option)


def _valid_name(name: str) -> None:
    from .common import check_name

    check_name(name)


def _input_options(layout: Optional[str], models: Optional[str], rename: Optional[str],
                   prompts: Optional[str]) -> dict:
    """The --layout, --models, --rename and --prompts texts as ingest's `layout`, `models`, `rename` and
    `prompts` arguments."""
    from .ingest_sources import parse_rename

    return {"layout": layout, "models": [m.strip() for m in models.split(",") if m.strip()] if models else None,
            "rename": parse_rename(rename), "prompts": prompts}


def _config(config: Optional[Path], overrides: Optional[List[str]]):
    from .config import load_config

    return load_config(config, overrides or [])


@app.command("demo-data")
def demo_data_cmd(
    out: Path = typer.Option(Path("data/raw/demo"), help="Folder for the three demo files."),
    n_prompts: int = typer.Option(3000, min=50, help="Number of synthetic prompts."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
):
    """Write the synthetic demo preference set in all three layouts (wide csv, long jsonl, pairwise parquet)."""
    from .demo import generate

    _writable(out)
    for layout, path in generate(out, n_prompts=n_prompts, seed=seed).items():
        console.print(f"[green]wrote[/] {layout:9s} {path}")



@app.callback()
def _root():
    """Train a compact pre-generation LLM router from preference data and ship it as an ONNX bundle."""


@app.command()
def ingest(
    data: List[str] = typer.Argument(..., help="A .csv, .tsv, .jsonl/.json (each may be .gz/.bz2/.xz compressed), "
                                               ".parquet or .arrow file, a folder of them (a downloaded hub dataset) "
                                               "or a hub dataset as hf:org/name; several are merged "
                                               "into one dataset."),
    layout: Optional[str] = LayoutOpt,
    name: Optional[str] = typer.Option(None, help="Dataset name under data/processed/ (default: the (first) file's "
                                                  "name without its type and compression suffixes)."),
    models: Optional[str] = ModelsOpt,
    rename: Optional[str] = RenameOpt,
    prompts: Optional[str] = PromptsOpt,
    split: str = typer.Option("train", help="Hub datasets: which split to read."),
    split_column: Optional[str] = SplitColumnOpt,
    test_data: Optional[str] = TestDataOpt,
    force: bool = typer.Option(False, help="Re-ingest even when the input and options are unchanged."),
):
    """Read preference data in any layout into the canonical Arrow dataset data/processed/NAME/."""
    from .ingest import ingest as run_ingest

    if name is not None:
        _valid_name(name)
    run_ingest(data[0] if len(data) == 1 else data, name=name, split=split, force=force,
               split_column=split_column, test_data=test_data, **_input_options(layout, models, rename, prompts))


@app.command()
def label(
    name: str = typer.Argument(..., help="Dataset name written by `prerouter ingest`."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = OverrideArg,
    force: bool = typer.Option(False, help="Relabel even when the dataset and options are unchanged."),
):
    """Turn outcomes into per-model training targets, difficulty, soft labels and the split."""
    from .label import label as run_label

    run_label(name, _config(config, overrides).label, force=force)


@app.command()
def train(
    name: str = typer.Argument(..., help="Labeled dataset name."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = OverrideArg,
    force: bool = typer.Option(False, help="Retrain even when labels and config are unchanged."),
):
    """Train the teacher head and distil the compact student (Lightning, tracked in MLflow)."""
    from .config import check_machine

    cfg = _config(config, overrides)  # a bad config fails before the training stack is imported
    check_machine(cfg.train)
    from .train import train as run_train

    run_train(name, cfg, force=force)


@app.command()
def evaluate(
    name: str = typer.Argument(..., help="Dataset name (its trained model under models/NAME is evaluated)."),
    bundle: Optional[Path] = typer.Option(None, help="Evaluate this exported bundle instead of the checkpoint."),
):
    """The router against simple baselines (TF-IDF, kNN, MF, cluster router, ...) on the test split."""
    from .evaluate import evaluate as run_evaluate

    run_evaluate(name, bundle=bundle)


@app.command()
def export(
    name: str = typer.Argument(..., help="Dataset name whose trained model is exported."),
    out: Optional[Path] = typer.Option(None, help="Bundle directory (default models/NAME/bundle)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = OverrideArg,
):
    """Export the student to ONNX fp32 + int8 with a parity gate and write the bundle."""
    from .export import export as run_export

    _writable(out)
    run_export(name, out=out, config=_config(config, overrides))


@app.command("check-latency")
def check_latency(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    budget_ms: float = typer.Option(1.0, help="Fail (exit 1) when p99 exceeds this many milliseconds."),
    decisions: int = typer.Option(1000, min=10, help="Timed decisions (after warm-up)."),
    fp32: bool = typer.Option(False, help="Time the fp32 model instead of int8."),
    clock: str = typer.Option("wall", help="p99 the gate reads: wall (what a caller waits) or cpu (the router's "
                                           "own work, stable on a busy machine)."),
):
    """Time single decisions (batch 1, one thread, tokenization included) per prompt-length bucket."""
    from .common import ConfigError
    from .latency import check_latency as run_check

    if clock not in ("wall", "cpu"):
        raise ConfigError(f"--clock must be wall or cpu, got {clock!r}")
    run_check(bundle, budget_ms=budget_ms, decisions=decisions, quantized=not fp32, clock=clock)


@app.command()
def route(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt: str = typer.Argument(..., help="The prompt to route."),
    strong_fraction: Optional[float] = StrongFractionOpt,
    threshold: Optional[float] = ThresholdOpt,
    cost_weight: Optional[float] = CostWeightOpt,
    show_scores: bool = typer.Option(False, "--scores", help="Print one JSON line instead: the routed model, each "
                                                             "model's probability and (pairs) the routing score."),
):
    """Print the model a prompt is routed to."""
    from .runtime import Router

    router = Router.load(bundle)
    if not show_scores:
        print(router.route(prompt, strong_fraction=strong_fraction, threshold=threshold, cost_weight=cost_weight))
        return
    import json

    p = router.score_one(prompt)
    print(json.dumps(router.describe(p, router.choose(p, strong_fraction, threshold, cost_weight)), ensure_ascii=False))


@app.command()
def score(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    input: Path = typer.Option(..., "--input", help="JSONL with a `prompt` (or OpenAI-style `messages`) field per "
                               "line, a JSON array of such objects, or CSV with a `prompt` column (each "
                               ".gz/.bz2/.xz compressed too), or parquet."),
    output: Path = typer.Option(..., "--output", help="JSONL written with per-model scores and the routed model."),
    strong_fraction: Optional[float] = StrongFractionOpt,
    threshold: Optional[float] = ThresholdOpt,
    cost_weight: Optional[float] = CostWeightOpt,
):
    """Score a file of prompts with a bundle."""
    from .prompt_files import score_file

    _writable(output, "file", "--output")
    score_file(bundle, input, output, strong_fraction=strong_fraction, threshold=threshold, cost_weight=cost_weight)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def serve(ctx: typer.Context):
    """Serve a bundle's routing decisions over HTTP (prerouter serve BUNDLE --help for the options)."""
    from .serve import main as serve_main

    sys.exit(serve_main(ctx.args))


@app.command()
def tune(
    name: str = typer.Argument(..., help="Labeled dataset name."),
    trials: Optional[int] = typer.Option(None, min=0, help="Trials in the whole study (default tune.trials); "
                                         "finished ones count, so a rerun or another worker runs only the rest."),
    timeout: Optional[float] = typer.Option(None, help="Stop starting trials after this many seconds."),
    storage: Optional[str] = typer.Option(None, help="Journal file, or an SQL URL shared by workers on several "
                                          "machines (default: mlruns/optuna/STUDY.journal)."),
    study_name: Optional[str] = typer.Option(None, help="Study name (default: prerouter-NAME-OBJECTIVE)."),
    objective: Optional[str] = typer.Option(None, help="quality (the data's validation routing measure: APGR, routed "
                                            "outcome or win prediction) | pareto (quality × p99 latency); "
                                            "default tune.objective."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = OverrideArg,
):
    """Search the student's hyperparameters and architecture with Optuna (pruned, resumable, multi-worker)."""
    from .tune import tune as run_tune

    run_tune(name, _config(config, overrides), trials=trials, timeout=timeout, storage=storage,
             study_name=study_name, objective=objective)


@app.command()
def report(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    data: str = typer.Option(..., help="Labeled dataset name, or a data file (or folder) to ingest + label first."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default BUNDLE/../report)."),
    profile: Optional[Path] = typer.Option(None, help="YAML model profile for the router/cascade/ensemble simulation."),
    layout: Optional[str] = LayoutOpt,
    models: Optional[str] = ModelsOpt,
    rename: Optional[str] = RenameOpt,
    prompts: Optional[str] = PromptsOpt,
):
    """Cost–quality curves, AIQ, calibration drift and router vs cascade vs ensemble, as Markdown + PNGs."""
    from .report import report as run_report

    _writable(out)
    run_report(bundle, data=data, out=out, profile=profile, read=_input_options(layout, models, rename, prompts))


@app.command()
def run(
    data: List[str] = typer.Argument(..., help="Preference data file, a folder of data files, or hf:org/name; "
                                               "several are merged into one dataset, as by ingest."),
    out: Optional[Path] = typer.Option(None, help="Bundle directory (default models/NAME/bundle)."),
    name: Optional[str] = typer.Option(None, help="Dataset/model name (default: the (first) file's stem)."),
    trials: int = typer.Option(0, min=0, help="Optuna trials before the final training (0: defaults)."),
    budget_ms: float = typer.Option(1.0, help="Latency gate: p99 budget in milliseconds."),
    layout: Optional[str] = LayoutOpt,
    models: Optional[str] = ModelsOpt,
    rename: Optional[str] = RenameOpt,
    prompts: Optional[str] = PromptsOpt,
    split_column: Optional[str] = SplitColumnOpt,
    test_data: Optional[str] = TestDataOpt,
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = OverrideArg,
):
    """ingest → label → train (→ tune) → export → check-latency → evaluate, as one MLflow run."""
    from .run import run as run_all

    _writable(out)
    if name is not None:
        _valid_name(name)
    run_all(data[0] if len(data) == 1 else data, out=out, name=name, trials=trials, budget_ms=budget_ms,
            config=_config(config, overrides),
            split_column=split_column, test_data=test_data, **_input_options(layout, models, rename, prompts))


@app.command()
def compare(
    champion: str = typer.Argument(..., help="Champion bundle folder or models:/prerouter-NAME@ALIAS."),
    challenger: str = typer.Argument(..., help="Challenger bundle folder or models:/prerouter-NAME@ALIAS."),
    data: str = typer.Option(..., help="Labeled dataset name (its test split), or a data file (or folder) held "
                                       "out whole."),
    margin: float = typer.Option(0.01, help="Promote unless the challenger may be worse by more than this "
                                            "(95% lower bound of challenger - champion > -margin)."),
    out: Optional[Path] = typer.Option(None, help="Folder for compare.md and compare.json "
                                                  "(default models/compare/TIMESTAMP)."),
    metric: str = typer.Option("auto", help="Verdict metric: auto (APGR, else routed outcome, else win "
                                            "accuracy) | apgr | routed | win."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    allow_missing_champion: bool = typer.Option(False, help="A registry champion that does not exist yet "
                                                            "means promote (the first retrain)."),
    layout: Optional[str] = LayoutOpt,
    models: Optional[str] = ModelsOpt,
    rename: Optional[str] = RenameOpt,
    prompts: Optional[str] = PromptsOpt,
):
    """Champion vs challenger on the same labeled prompts; exit 0 promote, 1 keep the champion, 2 bad input."""
    from .compare import compare as run_compare

    _writable(out)
    if allow_missing_champion and champion.startswith("models:/"):
        from .registry import exists

        if not exists(champion):
            console.print(f"[green]promote[/]: {champion} does not exist yet, so the challenger is the first champion")
            sys.exit(0)
    result = run_compare(champion, challenger, data, margin=margin, out=out, metric=metric, resamples=resamples,
                         seed=seed, read=_input_options(layout, models, rename, prompts))
    sys.exit(0 if result["verdict"] == "promote" else 1)  # typer.Exit would be swallowed (standalone_mode=False)


@app.command()
def promote(
    name: str = typer.Argument(..., help="Model name: NAME for the registered model prerouter-NAME."),
    version: str = typer.Argument(..., help="Registered version number, or a bundle folder (its version is "
                                            "found by bundle_sha256)."),
):
    """Set the registry alias `champion` on a version; the previous champion gets the alias `previous`."""
    from .registry import promote as run_promote

    run_promote(name, version)


@app.command()
def pull(
    spec: str = typer.Argument(..., help="NAME[@ALIAS] (alias champion by default; a number is a version), "
                                         "or models:/prerouter-NAME@ALIAS."),
    out: Path = typer.Option(..., help="Bundle folder to write (replaced whole)."),
):
    """Download a registered bundle and verify it (every sha256, then Router.load)."""
    from .registry import pull as run_pull

    _writable(out)
    run_pull(spec, out)


@app.command()
def calibrate(
    bundle: str = typer.Argument(..., help="Bundle folder or models:/prerouter-NAME@ALIAS."),
    prompts: Path = typer.Option(..., "--prompts", help="Unlabeled traffic, in any input `score` reads: JSONL "
                                                        "with a `prompt` or `messages` per line, a JSON array, "
                                                        "csv, tsv or parquet (text formats also compressed)."),
    out: Path = typer.Option(..., help="New bundle folder (replaced whole; may be BUNDLE itself)."),
    report: Optional[Path] = typer.Option(None, help="Folder for calibration.md / .json (default OUT.calibration)."),
):
    """Refit strong-share thresholds and cost λs on unlabeled prompts; report the score shift and the drift."""
    from .calibrate import calibrate as run_calibrate

    _writable(out)
    _writable(report, option="--report")
    run_calibrate(bundle, prompts, out, report=report)



def _print_error(message: str) -> None:
    """One line whatever the terminal: the lines of a multi-line message are joined with "; " and rich does
    not wrap it (a pipe or a file gets 80 columns otherwise); brackets in it are text, not markup."""
    from rich.markup import escape

    text = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)


# Errors of the machine, not of prerouter or the data: one line naming the path instead of a traceback.
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}
_MACHINE_HINTS = {
    errno.ENOSPC: "; free disk space, or point PREROUTER_DATA_DIR / PREROUTER_MODELS_DIR / PREROUTER_MLRUNS_DIR "
                  "at a larger disk",
    errno.EDQUOT: "; the disk quota is used up",
    errno.EROFS: "; the file system is read-only: point the PREROUTER_*_DIR variables or --out elsewhere",
}


def main() -> None:
    """Console entry point: user-facing errors become a red line and their exit code, not a traceback."""
    try:
        app(standalone_mode=False)
    except PrerouterError as e:
        _print_error(str(e))
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[yellow]aborted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in _MACHINE_ERRNOS:  # any other OSError may be a defect: its traceback helps
            raise
        what = f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror or e)
        _print_error(what + _MACHINE_HINTS.get(e.errno, ""))
        sys.exit(1)
    except Exception as e:
        if isinstance(e, _usage_errors()):  # a missing argument, an unknown option: click's message, exit 2
            e.show()
            sys.exit(e.exit_code)
        raise


def _usage_errors() -> tuple[type, ...]:
    """Click's usage errors: recent Typer raises its own copy of click's (whose base is TyperException),
    older Typer click's."""
    import click

    return (click.ClickException, *((typer.TyperException,) if hasattr(typer, "TyperException") else ()))
