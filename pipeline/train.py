"""Train stage: labeled dataset -> teacher head -> distilled compact student -> models/NAME/checkpoint.

One LightningModule (`module.RouterModule`) trains every network here, one LightningDataModule
(`data.RouterData`) feeds it. This module fits them (`fit_teacher`, `fit_student`), calibrates the
student's decision rules on validation, and writes the checkpoint (`train`).
"""
from __future__ import annotations

import logging
import os
import warnings
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn

from . import __version__, routing
from .common import (DataError, atomic_dir, console, flatten, labels_dir, model_dir, read_json, sha256_json,
                     write_json)
from .config import Config, load_config
from .data import Prepared, RouterData, collate, prepare, token_spec, tokenize
from .encoders import EmbeddingRouter, Ensemble, build_student, with_prior, teacher_path, tokenizer_file
from .module import RouterModule, pair_score
from .tokenization import load_tokenizer

CHECKPOINT = "checkpoint"
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU banners per fit
# Lightning builds torch's deprecated LeafSpec on every fit: a FutureWarning no user of prerouter can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# A small train split has fewer batches than the logging interval: steps are still logged every 10, across epochs.
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")


# ----------------------------------------------------------------------------- fitting

def make_trainer(cfg: Config, workdir: Path, callbacks=(), logger=False, monitor="val_loss",
                 max_epochs: int | None = None) -> tuple[pl.Trainer, ModelCheckpoint]:
    """A deterministic Trainer with early stopping on `monitor` and its best checkpoint (weights only)."""
    t = cfg.train
    mode = "max" if monitor.endswith("apgr") else "min"
    ckpt = ModelCheckpoint(dirpath=workdir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           save_weights_only=True)
    trainer = pl.Trainer(
        max_epochs=max_epochs or t.max_epochs, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision, deterministic=True, logger=logger,
        callbacks=[EarlyStopping(monitor, patience=t.patience, mode=mode), ckpt, *callbacks],
        enable_model_summary=False, enable_progress_bar=console.is_terminal, log_every_n_steps=10,
        num_sanity_val_steps=0, default_root_dir=workdir,
    )
    return trainer, ckpt


def _best_state(trainer: pl.Trainer, ckpt: ModelCheckpoint) -> dict:
    """The best checkpoint's weights, on every process: rank 0 saved the file (on its own disk, which the
    other nodes of a multi-node job may not see) and sends the weights to the others."""
    state = None
    if trainer.is_global_zero:
        state = torch.load(ckpt.best_model_path, weights_only=True, map_location="cpu")["state_dict"]
    return trainer.strategy.broadcast(state, src=0)


def is_global_zero() -> bool:
    """Whether this process is rank 0 of its job, known before any Trainer exists.

    Lightning's ddp runs the command once per device (the first process starts the others with
    LOCAL_RANK, NODE_RANK and WORLD_SIZE set); torchrun sets RANK; a SLURM job with several tasks sets
    SLURM_PROCID. Every process runs the same fits in the same order; only rank 0 writes the checkpoint
    directory and the MLflow run."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env or "NODE_RANK" in env:
        return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", 0)) == 0
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return True


def fit_teacher(prep: Prepared, cfg: Config, workdir: Path) -> EmbeddingRouter:
    """The teacher's head over frozen sentence embeddings; fills `prep.teacher_prob`."""
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    tc = cfg.teacher
    net = EmbeddingRouter(prep.teacher_emb.shape[1], tc.head_hidden, len(prep.models), tc.dropout)
    module = RouterModule(net, tc.lr, tc.weight_decay, pair=prep.pair, uses_tokens=False,
                          contrast_weight=cfg.train.contrast_weight)
    trainer, ckpt = make_trainer(cfg, workdir / "teacher", max_epochs=tc.epochs)
    prep.teacher_prob = None  # the teacher learns from hard labels only
    trainer.fit(module, datamodule=RouterData(prep, tc.batch_size))
    module.load_state_dict(_best_state(trainer, ckpt))
    net.float().eval()  # float32 whatever train.precision trained it in
    with torch.no_grad():
        prep.teacher_prob = torch.sigmoid(net(torch.from_numpy(prep.teacher_emb))).numpy()
    return net


def fit_student(prep: Prepared, cfg: Config, workdir: Path, callbacks=(), logger=False,
                monitor: str = "val_loss") -> tuple[nn.Module, ModelCheckpoint]:
    """Distil the configured student from the teacher: `student.members` nets, member k seeded with
    train.seed + 1000·k, each its own Lightning run with early stopping. Returns the net (an `Ensemble`
    of the members' best weights when there are several) and member 0's checkpoint callback.

    `callbacks` (e.g. Optuna's pruning) watch member 0 only; the other members log to `logger`'s run
    under the prefix memberK."""
    one = cfg.model_copy(update={"student": cfg.student.model_copy(update={"members": 1})})
    fits = []
    for k in range(cfg.student.members):
        seeded = one.model_copy(update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + 1000 * k})})
        fits.append(_fit_member(prep, seeded, workdir / member_dir(k), callbacks if k == 0 else (),
                                _member_logger(logger, k), monitor))
    nets = [net for net, _ in fits]
    return (nets[0] if len(nets) == 1 else Ensemble(nets).eval()), fits[0][1]


def member_dir(k: int) -> str:
    """Member k's Lightning folder under the training work dir (member 0's is the one-student name)."""
    return "student" if k == 0 else f"student{k}"


def _member_logger(logger, k: int):
    """Member k's logger: `logger` itself for member 0, else the same MLflow run under prefix memberK."""
    if not logger or k == 0:
        return logger
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(run_id=logger.run_id, tracking_uri=mlflow.get_tracking_uri(), prefix=f"member{k}")


def _fit_member(prep: Prepared, cfg: Config, workdir: Path, callbacks, logger,
                monitor: str) -> tuple[nn.Module, ModelCheckpoint]:
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    net = build_student(cfg.student, vocab_size=load_tokenizer(tokenizer_file(cfg.teacher.path)).get_vocab_size(),
                        n_models=len(prep.models), teacher=cfg.teacher.path)
    t = cfg.train
    module = RouterModule(net, t.lr, t.weight_decay, t.distill_weight, t.repr_weight,
                          prep.teacher_emb.shape[1], prep.pair, contrast_weight=t.contrast_weight)
    trainer, ckpt = make_trainer(cfg, workdir, callbacks, logger, monitor)
    trainer.fit(module, datamodule=RouterData(prep, t.batch_size, tokenize(prep, cfg), t.num_workers))
    module.load_state_dict(_best_state(trainer, ckpt))
    return net.float().eval(), ckpt  # float32 whatever train.precision trained it in: export stays fp32/int8


@torch.inference_mode()
def predict(net: nn.Module, prep: Prepared, cfg: Config, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Student probabilities [len(rows), n_models]."""
    return student_outputs(net, prep, cfg, rows, batch_size)[1]


@torch.no_grad()
def student_outputs(net: nn.Module, prep: Prepared, cfg: Config, rows: np.ndarray,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The student's pooled features [len(rows), dim] and probabilities [len(rows), n_models]."""
    ids = tokenize(prep, cfg)
    hs, ps = [], []
    for i in range(0, len(rows), batch_size):
        batch = collate([{"ids": ids[r], "target": prep.target[r]} for r in rows[i:i + batch_size]])
        h = net.features(batch["input_ids"], batch["attention_mask"])
        hs.append(h.numpy())
        ps.append(torch.sigmoid(with_prior(net, h)).numpy())
    if not hs:
        return np.zeros((0, net.feature_dim), np.float32), np.zeros((0, len(prep.models)), np.float32)
    return np.concatenate(hs), np.concatenate(ps)


# ----------------------------------------------------------------------------- decisions + metrics

def decision_rules(prep: Prepared, p_val: np.ndarray) -> dict:
    """Thresholds for strong-call fractions (pair) and λ for cost budgets (N models), from validation."""
    from .metrics import calibrate_lambdas, calibrate_thresholds, realised_fractions, unreachable_fractions

    rules: dict = {"kind": "pair" if len(prep.models) == 2 else "multi"}
    if prep.battles is not None:  # trained as per-prompt Bradley-Terry strengths (RouterModule._battle_loss)
        rules["win_probability"] = routing.WIN_PROBABILITY
    if prep.pair is not None:
        scores = pair_score(p_val, prep.pair)
        thresholds = calibrate_thresholds(scores)
        rules.update(weak=prep.models[prep.pair[0]], strong=prep.models[prep.pair[1]],
                     score=routing.PAIR_SCORE, thresholds=thresholds, default_strong_fraction=0.5)
        # Tied scores (identical prompts, or a template the student cannot see past) send all or none of
        # a tie to strong: say which targets validation could not meet, with what it realised instead.
        missed = unreachable_fractions(realised_fractions(scores, thresholds))
        if missed:
            rules["unreachable_fractions"] = missed
            console.print(f"[yellow]tied scores: strong shares {', '.join(missed)} cannot be met "
                          f"(validation realises {', '.join(map(str, missed.values()))})[/]")
    if len(prep.models) > 2:
        costs = routing.fill_unknown_costs(prep.costs)
        rules["costs_assumed"] = any(c is None for c in prep.costs)
        rules["cost_lambdas"] = calibrate_lambdas(p_val, costs)
        if all(c is None for c in prep.costs):
            # No cost is known: a budget over the assumed index + 1 costs would trade quality for the column
            # order. The served default is then the best predicted model, the decision `evaluate` scores.
            rules["default_cost_weight"] = 0.0
    return rules


def bundle_meta(prep: Prepared, cfg: Config, p_val: np.ndarray) -> dict:
    """What export needs of a student besides its weights: models and costs, tokenization, calibrated
    decision rules (from its validation outputs `p_val`, whose score quantiles `prerouter calibrate`
    compares traffic against), data hash and config."""
    from .calibrate import score_reference

    return {"name": prep.name,
            "models": [{"name": m, "cost": c, "index": i} for i, (m, c) in enumerate(zip(prep.models, prep.costs))],
            "tokenizer": token_spec(cfg, prep) | {"source": str(tokenizer_file(cfg.teacher.path))},
            "decision": decision_rules(prep, p_val) | {"reference": score_reference(p_val, prep.models, prep.pair)},
            "data_hash": prep.data_hash, "config": cfg.to_dict()}


def split_metrics(prep: Prepared, p: np.ndarray, rows: np.ndarray) -> dict:
    """Routing metrics of probabilities `p` (aligned with `rows`) for the pair, mean BCE, and `quality`: the
    data's routing measure (`select.val_quality`), which a tune study maximises."""
    from .metrics import routing_metrics
    from .select import val_quality

    t, m = prep.target[rows], prep.mask[rows]
    eps = 1e-6
    bce = -(t * np.log(p + eps) + (1 - t) * np.log(1 - p + eps))
    out = {"bce": float((bce * m).sum() / max(m.sum(), 1))}
    if len(rows):
        out["quality"] = val_quality(prep, p, rows)
    if prep.pair is not None:
        weak, strong = prep.pair
        both = m[:, weak] & m[:, strong]
        if both.sum() > 1:
            out.update(routing_metrics(pair_score(p[both], prep.pair), t[both, weak], t[both, strong]))
    return out


# ----------------------------------------------------------------------------- entry point

@dataclass
class Trained:
    student: nn.Module
    meta: dict
    checkpoint_dir: Path


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


def fingerprint(name: str, cfg: Config) -> str:
    """What a checkpoint was trained from: the labels' content hash and the full config."""
    stats_file = labels_dir(name) / "label_stats.json"
    labels = read_json(stats_file).get("content_hash") if stats_file.is_file() else None
    return sha256_json({"labels": labels, "config": cfg.to_dict(), "version": __version__})


def train(name: str, cfg: Config | None = None, prep: Prepared | None = None, force: bool = False) -> Path:
    """Teacher head + distilled student on the train split; writes models/NAME/checkpoint atomically.

    Skipped when the checkpoint was trained from the same labels and config (unless `force`)."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    from .common import setup_mlflow

    cfg = cfg or load_config()
    final = model_dir(name) / CHECKPOINT
    fp = fingerprint(name, cfg)
    if not force and (final / "meta.json").is_file() and read_json(final / "meta.json").get("fingerprint") == fp:
        console.print(f"[dim]train: {final} is up to date (same labels and config), skipping[/]")
        return final
    prep = prep or prepare(name, cfg)
    # Under ddp every process runs this function and the same fits; only rank 0 writes (a second writer
    # would wait forever on the checkpoint directory's lock, held by rank 0 while the fits need both).
    zero = is_global_zero()
    with ExitStack() as stack:
        if zero:
            setup_mlflow()
            tmp = stack.enter_context(atomic_dir(final))
            run = stack.enter_context(mlflow.start_run(run_name=f"train-{name}",
                                                       nested=mlflow.active_run() is not None))
            mlflow.log_params(flatten(cfg.to_dict()))
            mlflow.set_tags({"data_hash": prep.data_hash, "git_commit": _git_commit() or "unknown",
                             "dataset": name, "student": cfg.student.family})
            mlflow.log_dict(prep.stats, "label_stats.json")
            console.print(f"[bold]teacher[/] head on {prep.teacher_emb.shape[1]}-d embeddings")
        else:  # Lightning keeps rank 0's checkpoint directory; this one only holds what a Trainer may create
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prerouter-rank-")))
        selection = None
        if cfg.train.group_by == "auto":
            from .select import choose_group_by

            teacher, cfg, selection = choose_group_by(prep, cfg, tmp)
            if zero:
                mlflow.log_dict(selection, "selection.json")
                mlflow.set_tag("group_by", str(cfg.train.group_by))
        else:
            teacher = fit_teacher(prep, cfg, tmp)
        logger = MLFlowLogger(run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri()) if zero else False
        if zero:
            members = f", {cfg.student.members} members (seeds {cfg.train.seed} + 1000·k)" if cfg.student.members > 1 else ""
            console.print(f"[bold]student[/] {cfg.student.family} dim={cfg.student.dim}{members}")
        student, _ = fit_student(prep, cfg, tmp, logger=logger)
        if not zero:
            return final
        val, test = prep.rows("val"), prep.rows("test")
        if cfg.train.cluster_prior:
            from .prior import fit_cluster_prior

            h_train = student_outputs(student.eval(), prep, cfg, prep.rows("train"))[0]
            h_val, p_val = student_outputs(student, prep, cfg, val)
            student.prior, record = fit_cluster_prior(prep, h_train, h_val, p_val, cfg.train.seed)
            selection = (selection or {}) | {"cluster_prior": record}
            mlflow.log_dict(record, "cluster_prior.json")
        p_val, p_test = predict(student, prep, cfg, val), predict(student, prep, cfg, test)
        metrics = {"val": split_metrics(prep, p_val, val), "test": split_metrics(prep, p_test, test),
                   "teacher_test": split_metrics(prep, prep.teacher_prob[test], test)}
        for split, values in metrics.items():
            mlflow.log_metrics({f"{split}_{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        meta = bundle_meta(prep, cfg, p_val) | {
            "pipeline_version": __version__, "metrics": metrics, "teacher": teacher_path(cfg.teacher.path),
            "mlflow_run_id": run.info.run_id, "fingerprint": fp, "selection": selection,
        }
        torch.save(student.state_dict(), tmp / "student.pt")
        torch.save(teacher.state_dict(), tmp / "teacher_head.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json(tmp / "meta.json", meta)
        for sub in ("teacher", *map(member_dir, range(cfg.student.members))):
            shutil.rmtree(tmp / sub, ignore_errors=True)  # Lightning's best checkpoints: the .pt files' weights
        mlflow.log_artifacts(str(tmp), artifact_path="checkpoint")
        _print_metrics(metrics)
    return final


def load_trained(name_or_dir: str | Path) -> Trained:
    """The trained student (eval mode) and its metadata, from models/NAME/checkpoint or a directory."""
    path = Path(name_or_dir)
    if not (path / "meta.json").is_file():
        path = model_dir(str(name_or_dir)) / CHECKPOINT
    if not (path / "meta.json").is_file():
        raise DataError(f"no trained model at {path}: run `prerouter train {name_or_dir}` first")
    meta = read_json(path / "meta.json")
    # Checkpoints from before `student.members` hold one student, whatever the default is now.
    meta["config"].setdefault("student", {}).setdefault("members", 1)
    cfg = load_config(base=meta["config"])
    vocab = load_tokenizer(meta["tokenizer"]["source"]).get_vocab_size()
    student = build_student(cfg.student, vocab, len(meta["models"]), cfg.teacher.path, pretrained_init=False)
    state = torch.load(path / "student.pt", weights_only=True)
    if "prior.centroids" in state:
        from .prior import ClusterPrior

        k, dim = state["prior.centroids"].shape
        student.prior = ClusterPrior.empty(k, dim, len(meta["models"]))
        state.setdefault("prior.strengths", torch.tensor(0.0))  # priors saved before strength tables: rates
    student.load_state_dict(state)
    return Trained(student.eval(), meta, path)


def _print_metrics(metrics: dict) -> None:
    from rich.table import Table

    table = Table(title="router metrics (student unless noted)")
    for col in ("split", "APGR", "CPT(50%)", "CPT(80%)", "BCE", "n"):
        table.add_column(col, justify="left" if col == "split" else "right")
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    for split, m in metrics.items():
        table.add_row(split, *(fmt(m.get(k)) for k in ("apgr", "cpt50", "cpt80", "bce", "n")))
    console.print(table)
