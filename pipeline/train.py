"""Train stage: labeled dataset -> teacher head -> distilled compact student -> models/NAME/checkpoint.

One LightningModule (`RouterModule`) trains every network here, one LightningDataModule
(`RouterData`) feeds it. The loss is BCE on observed targets only (masked), so a 2-model table, an
N-model table and sparse pairwise win rates train the same way. The student additionally learns from
the teacher: soft targets (the teacher head's probabilities, on every model, observed or not) and
representation regression (its pooled features, projected, onto the teacher's sentence embedding).
With `train.group_by`, both fit targets smoothed toward their metadata group's rate (`group_smoothed`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import __version__, routing
from .common import (DataError, atomic_dir, console, flatten, labels_dir, model_dir, processed_dir, prompt_id,
                     read_json, sha256_json, write_json)
from .config import Config, load_config
from .encoders import (EmbeddingRouter, build_student, with_prior, teacher_embeddings, teacher_path,
                       tokenizer_file)
from .tokenization import compact_templates, encode, learn_templates, load_tokenizer, make_spec

CHECKPOINT = "checkpoint"
UNREACHABLE_TOLERANCE = 0.05  # a calibrated strong share realised further off than this on validation is reported
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU banners per fit


# ----------------------------------------------------------------------------- data

@dataclass
class Prepared:
    """Everything the networks train on, aligned by row (one row per labeled prompt)."""

    name: str
    models: list[str]
    costs: list[float | None]
    pair: tuple[int, int] | None  # (weak index, strong index)
    prompts: list[str]
    prompt_ids: list[str]
    target: np.ndarray  # [n, m] float32 in [0, 1]
    mask: np.ndarray  # [n, m] bool
    split: np.ndarray  # [n] str
    teacher_emb: np.ndarray  # [n, d]
    data_hash: str
    stats: dict
    teacher_prob: np.ndarray | None = None  # [n, m], filled by the teacher head
    fit_target: np.ndarray | None = None  # [n, m] what the nets fit: `target`, train rows group-smoothed
    templates: dict | None = None  # shared prefixes/suffixes of the train prompts (runtime.compact_templates)
    battles: list[np.ndarray] | None = None  # pairwise data: per row, [k, 3] (model a, model b, a's score)
    group_columns: dict = field(default_factory=dict)  # train.group_by=auto: candidate column -> values
    tokens: dict = field(default_factory=dict)  # spec key -> (ids list, spec)

    def __post_init__(self):
        if self.fit_target is None:
            self.fit_target = self.target

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def training_split(split, cfg: Config) -> np.ndarray:
    """Each prompt's split, with train prompts beyond `train.limit_train_prompts` marked "unused"."""
    split = np.asarray(split)
    if cfg.train.limit_train_prompts:
        split[np.flatnonzero(split == "train")[cfg.train.limit_train_prompts:]] = "unused"
    return split


def teacher_inputs(prompts: list[str], prompt_ids: list[str], split: np.ndarray,
                   cfg: Config) -> tuple[dict | None, list[str], list[str]]:
    """(templates learned on the train split or None, the texts the teacher embeds, their cache ids).

    The teacher reads a prompt as the student will (templates shortened), cached under that text's id."""
    templates = learn_templates([prompts[i] for i in np.flatnonzero(split == "train")]) if cfg.student.templates else None
    if not (templates and (templates["prefixes"] or templates["suffixes"])):
        templates = None
    texts = [compact_templates(p, {"templates": templates}) for p in prompts]
    return templates, texts, [pid if t == p else prompt_id(t) for pid, p, t in zip(prompt_ids, prompts, texts)]


def prepare(name: str, cfg: Config) -> Prepared:
    """Load the labels and the (cached) teacher embeddings; with `train.group_by`, the smoothed fit targets."""
    from .ingest import list_matrix
    from .label import load_labels

    ds, stats = load_labels(name)
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    models = list(stats["models"])
    manifest = read_json(processed_dir(name) / "manifest.json")
    costs = [manifest.get("costs", {}).get(m) for m in models]
    pair = None
    if stats.get("pair"):
        pair = (models.index(stats["pair"]["weak"]), models.index(stats["pair"]["strong"]))
    prompts = table.column("prompt").to_pylist()
    prompt_ids = table.column("prompt_id").to_pylist()
    split = training_split(table.column("split").to_pylist(), cfg)
    groups, group_columns = None, {}
    if cfg.train.group_by == "auto":  # candidates for select.choose_group_by
        from .select import group_candidates

        known = [c for c in manifest.get("metadata_columns", []) if c in table.column_names]
        group_columns = group_candidates({c: table.column(c).to_pylist() for c in known}, split == "train")
    elif cfg.train.group_by:  # checked before the (slow) teacher embeddings
        if cfg.train.group_by not in table.column_names:
            known = manifest.get("metadata_columns", [])
            raise DataError(f"train.group_by={cfg.train.group_by!r}: {name!r} has no such column "
                            f"(metadata columns: {', '.join(known) or 'none'})")
        groups = [str(g) for g in table.column(cfg.train.group_by).to_pylist()]
    for s in ("train", "val"):
        if not (split == s).any():
            raise DataError(f"the {s} split of {name!r} is empty: need more prompts or other split fractions")
    templates, texts, text_ids = teacher_inputs(prompts, prompt_ids, split, cfg)
    if templates:
        console.print(f"templates: {len(templates['prefixes'])} shared prefixes and {len(templates['suffixes'])} "
                      "suffixes shortened before tokenizing")
    prep = Prepared(
        name=name, models=models, costs=costs, pair=pair, prompts=prompts, prompt_ids=prompt_ids,
        target=list_matrix(table, "target", np.float32), mask=list_matrix(table, "mask", bool),
        split=split, teacher_emb=teacher_embeddings(texts, text_ids, cfg.teacher.path, cfg.teacher.max_tokens,
                                                    cfg.teacher.batch_size, cfg.teacher.device, job=cfg.train),
        data_hash=stats.get("content_hash", manifest.get("content_hash", "")), stats=stats,
        templates=templates, battles=_battles(name, prompt_ids), group_columns=group_columns,
    )
    if groups is not None:
        prep.fit_target = group_smoothed(prep.target, prep.mask, groups, split == "train",
                                         cfg.train.group_smoothing)
    return prep


def _battles(name: str, prompt_ids: list[str]) -> list[np.ndarray] | None:
    """Pairwise data: each labeled prompt's battles as rows (model a, model b, a's score); else None."""
    path = processed_dir(name) / "battles"
    if not path.exists():
        return None
    from datasets import load_from_disk

    table = load_from_disk(str(path)).data
    row_of = {pid: j for j, pid in enumerate(prompt_ids)}
    rows = np.array([row_of.get(pid, -1) for pid in table.column("prompt_id").to_pylist()])
    abs_ = np.stack([table.column(c).to_numpy().astype(np.float32) for c in ("model_a", "model_b", "score_a")], 1)
    keep = rows >= 0
    rows, abs_ = rows[keep], abs_[keep]
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(len(prompt_ids) + 1))
    return [abs_[order[bounds[i]:bounds[i + 1]]] for i in range(len(prompt_ids))]


def group_smoothed(target: np.ndarray, mask: np.ndarray, groups: list[str], train: np.ndarray,
                   weight: float, prior_count: float = 10.0) -> np.ndarray:
    """Train targets moved `weight` of the way to their group's train rate (other rows unchanged).

    A group's rate is shrunk toward the global rate by `prior_count` pseudo-observations, so a group
    with a handful of prompts does not hand its few noisy outcomes to all of them."""
    _, gid = np.unique(groups, return_inverse=True)
    obs = mask & train[:, None]
    n = np.zeros((gid.max() + 1, target.shape[1]))
    np.add.at(n, gid, obs)
    hits = np.zeros_like(n)
    np.add.at(hits, gid, np.where(obs, target, 0.0))
    overall = hits.sum(0) / np.maximum(n.sum(0), 1)
    rate = (hits + prior_count * overall) / (n + prior_count)
    out = target.copy()
    out[train] = (1 - weight) * target[train] + weight * rate[gid[train]]
    return out.astype(np.float32)


class _Rows(Dataset):
    def __init__(self, prep: Prepared, rows: np.ndarray, ids: list[np.ndarray] | None):
        self.prep, self.rows, self.ids = prep, rows, ids

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        item = {"target": self.prep.fit_target[r], "mask": self.prep.mask[r], "emb": self.prep.teacher_emb[r],
                "row": np.int64(r)}  # validation metrics gathered across processes are deduplicated by row
        if self.prep.teacher_prob is not None:
            item["soft"] = self.prep.teacher_prob[r]
        if self.ids is not None:
            item["ids"] = self.ids[r]
        if self.prep.battles is not None:
            item["battles"] = self.prep.battles[r]
        return item


def _collate(items: list[dict]) -> dict:
    batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0] if k not in ("ids", "battles")}
    if "battles" in items[0]:  # pairwise data: per-prompt battle outcomes as dense [b, m, m] pair targets
        m = items[0]["target"].shape[0]
        score = np.zeros((len(items), m, m), dtype=np.float32)
        count = np.zeros_like(score)
        for j, it in enumerate(items):
            a, b, s = it["battles"][:, 0].astype(int), it["battles"][:, 1].astype(int), it["battles"][:, 2]
            np.add.at(score[j], (a, b), s)
            np.add.at(score[j], (b, a), 1 - s)
            np.add.at(count[j], (a, b), 1)
            np.add.at(count[j], (b, a), 1)
        batch["pair_target"] = torch.from_numpy(score / np.maximum(count, 1))
        batch["pair_weight"] = torch.from_numpy((count > 0).astype(np.float32))
    if "ids" in items[0]:
        width = max(len(it["ids"]) for it in items)
        ids = np.zeros((len(items), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for j, it in enumerate(items):
            ids[j, : len(it["ids"])] = it["ids"]
            mask[j, : len(it["ids"])] = 1
        batch["input_ids"], batch["attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    return batch


class RouterData(pl.LightningDataModule):
    """Train/val/test loaders over a Prepared dataset; token ids (if any) are per-prompt arrays."""

    def __init__(self, prep: Prepared, batch_size: int, ids: list[np.ndarray] | None = None,
                 num_workers: int = 0):
        super().__init__()
        self.prep, self.ids, self.batch_size, self.num_workers = prep, ids, batch_size, num_workers

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(_Rows(self.prep, self.prep.rows(split), self.ids), batch_size=self.batch_size,
                          shuffle=shuffle, collate_fn=_collate, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


# ----------------------------------------------------------------------------- model

def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1.0)


def contrast_loss(logits: torch.Tensor, pair_target: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """BCE of sigmoid(logit_j - logit_k) against P(j beats k on the prompt), over weighted pairs.

    Per-model heads trained apart fit each model's level; routing needs their differences. This term
    trains the differences directly: on pairwise data against the prompt's battles, on outcome tables
    against (1 + y_j - y_k) / 2 for every pair of models observed on the prompt."""
    diff = logits.unsqueeze(2) - logits.unsqueeze(1)  # [b, m, m]
    loss = nn.functional.binary_cross_entropy_with_logits(diff, pair_target, reduction="none")
    return (loss * pair_weight).sum() / pair_weight.sum().clamp(min=1.0)


def outcome_pairs(target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair targets (1 + y_j - y_k) / 2 and weights (both observed, j != k) from an outcome table [b, m]."""
    both = (mask.unsqueeze(2) & mask.unsqueeze(1)).to(target.dtype)
    both = both * (1 - torch.eye(target.shape[1], dtype=target.dtype, device=target.device))
    return (1 + target.unsqueeze(2) - target.unsqueeze(1)) / 2, both


def pair_score(p: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
    """Routing score for a weak/strong pair: expected quality gain of the strong model, mapped to [0, 1]."""
    return routing.pair_score(p, *pair)


class RouterModule(pl.LightningModule):
    """Masked BCE on observed targets, plus distillation from the teacher when the net is a student."""

    def __init__(self, net: nn.Module, lr: float, weight_decay: float, distill_weight: float = 0.0,
                 repr_weight: float = 0.0, teacher_dim: int | None = None, pair=None, uses_tokens=True,
                 contrast_weight: float = 0.0):
        super().__init__()
        self.net, self.lr, self.weight_decay, self.contrast_weight = net, lr, weight_decay, contrast_weight
        self.distill_weight, self.repr_weight, self.pair, self.uses_tokens = (
            distill_weight, repr_weight, pair, uses_tokens)
        self.proj = nn.Linear(net.feature_dim, teacher_dim) if repr_weight > 0 and teacher_dim else None
        self._val: list[tuple[torch.Tensor, ...]] = []

    def _features(self, batch):
        if self.uses_tokens:
            return self.net.features(batch["input_ids"], batch["attention_mask"])
        return self.net.features(batch["emb"])

    def _loss(self, batch, h, logits):
        if "pair_target" in batch:
            return self._battle_loss(batch, h, logits)
        hard = masked_bce(logits, batch["target"], batch["mask"])
        loss = hard
        if self.distill_weight > 0 and "soft" in batch:
            soft = nn.functional.binary_cross_entropy_with_logits(logits, batch["soft"])
            loss = (1 - self.distill_weight) * hard + self.distill_weight * soft
        if self.contrast_weight > 0:
            if "pair_target" in batch:
                pt, pw = batch["pair_target"], batch["pair_weight"]
            else:
                pt, pw = outcome_pairs(batch["target"], batch["mask"])
            if self.distill_weight > 0 and "soft" in batch:  # the teacher's differences, like its levels
                t_logit = torch.logit(batch["soft"].clamp(1e-4, 1 - 1e-4))
                t_pair = torch.sigmoid(t_logit.unsqueeze(2) - t_logit.unsqueeze(1))
                pt = (1 - self.distill_weight) * pt + self.distill_weight * t_pair
                pw = torch.maximum(pw, 1 - torch.eye(pw.shape[1], dtype=pw.dtype, device=pw.device))
            loss = loss + self.contrast_weight * contrast_loss(logits, pt, pw)
        if self.proj is not None:
            cos = nn.functional.cosine_similarity(self.proj(h), batch["emb"], dim=-1)
            loss = loss + self.repr_weight * (1 - cos).mean()
        return loss, hard

    def _battle_loss(self, batch, h, logits):
        """Pairwise data: a per-prompt Bradley-Terry model. Only differences of logits are observed (who
        beat whom), so the logits are strengths and every term is on differences: the battles, the
        teacher's strength differences (distillation), and the representation regression."""
        hard = contrast_loss(logits, batch["pair_target"], batch["pair_weight"])
        loss = hard
        if self.distill_weight > 0 and "soft" in batch:
            t_logit = torch.logit(batch["soft"].clamp(1e-4, 1 - 1e-4))
            off = 1 - torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
            soft = contrast_loss(logits, torch.sigmoid(t_logit.unsqueeze(2) - t_logit.unsqueeze(1)),
                                 off.expand(len(logits), -1, -1))
            loss = (1 - self.distill_weight) * hard + self.distill_weight * soft
        if self.proj is not None:
            cos = nn.functional.cosine_similarity(self.proj(h), batch["emb"], dim=-1)
            loss = loss + self.repr_weight * (1 - cos).mean()
        return loss, hard

    def forward(self, batch):
        return self.net.head(self._features(batch))

    def training_step(self, batch, _):
        h = self._features(batch)
        loss, hard = self._loss(batch, h, self.net.head(h))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch, _):
        h = self._features(batch)
        logits = self.net.head(h)
        _, hard = self._loss(batch, h, logits)
        # sync_dist: under ddp every process sees the same mean, so early stopping and checkpointing agree
        self.log("val_loss", hard, prog_bar=True, batch_size=len(batch["target"]), sync_dist=True)
        if self.pair is not None:  # kept on the device until the epoch's outputs are gathered
            rows = batch["row"] if "row" in batch else torch.full((len(logits),), -1, device=logits.device)
            self._val.append((torch.sigmoid(logits.detach()).float(), batch["target"].float(),
                              batch["mask"].to(torch.uint8), rows.to(torch.int64)))

    def on_validation_epoch_end(self):
        if self.pair is not None:
            p, t, m, rows = self._validation_outputs()
            weak, strong = self.pair
            both = m[:, weak] & m[:, strong]
            if both.sum() > 1:
                from .metrics import apgr

                # identical on every process (computed from all of them), so the mean sync_dist takes is a no-op
                self.log("val_apgr", float(apgr(pair_score(p[both], self.pair), t[both, weak], t[both, strong])),
                         prog_bar=True, sync_dist=True)
        self._val.clear()

    def _validation_outputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This epoch's validation (probabilities, targets, mask, rows) from every process, on the host.

        Under a distributed strategy each process validates its share of the rows (the distributed
        sampler pads the shares to equal length by repeating rows); the shares are all-gathered and
        deduplicated by row, so every process computes the metric on the whole validation split, in the
        order one process would see it."""
        width = self.net.head.net[-1].out_features
        cols = [torch.cat(c) for c in zip(*self._val)] if self._val else [
            torch.zeros((0, width), device=self.device), torch.zeros((0, width), device=self.device),
            torch.zeros((0, width), dtype=torch.uint8, device=self.device),
            torch.zeros(0, dtype=torch.int64, device=self.device)]
        if self.trainer.world_size > 1:
            sizes = self.all_gather(torch.tensor([len(cols[0])], device=cols[0].device)).flatten().tolist()
            top = max(sizes)
            padded = []
            for c in cols:  # all_gather needs equal shapes: pad every share to the longest
                out = c.new_zeros((top, *c.shape[1:]))
                out[: len(c)] = c
                padded.append(self.all_gather(out))  # [world, top, ...]
            cols = [torch.cat([g[r, :n] for r, n in enumerate(sizes)]) for g in padded]
        p, t, m, rows = (c.cpu().numpy() for c in cols)
        if (rows >= 0).all():
            _, first = np.unique(rows, return_index=True)  # sorted by row, each row once
            p, t, m, rows = p[first], t[first], m[first], rows[first]
        return p, t, m.astype(bool), rows

    def configure_optimizers(self):
        # fused: one kernel over all parameters; ~5x faster steps on CPU for the 30k-row embedding table
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)


# ----------------------------------------------------------------------------- fitting

def token_spec(cfg: Config, prep: Prepared | None = None) -> dict:
    s = cfg.student
    spec = make_spec(s.max_tokens, s.truncation, s.head_fraction)
    return spec | {"templates": prep.templates} if prep is not None and prep.templates else spec


def tokenize(prep: Prepared, cfg: Config) -> list[np.ndarray]:
    """Token ids per prompt with the runtime's own encoder, so training sees what serving sees."""
    spec = token_spec(cfg, prep)
    key = json.dumps(spec, sort_keys=True)
    if key not in prep.tokens:
        tok = load_tokenizer(tokenizer_file(cfg.teacher.path))
        ids = []
        for i in range(0, len(prep.prompts), 1024):
            batch_ids, batch_mask = encode(tok, prep.prompts[i:i + 1024], spec)
            ids += [row[: int(m.sum())] for row, m in zip(batch_ids, batch_mask)]
        prep.tokens[key] = ids
    return prep.tokens[key]


def _trainer(cfg: Config, workdir: Path, callbacks=(), logger=False, monitor="val_loss",
             max_epochs: int | None = None) -> tuple[pl.Trainer, ModelCheckpoint]:
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
    trainer, ckpt = _trainer(cfg, workdir / "teacher", max_epochs=tc.epochs)
    saved, prep.teacher_prob = prep.teacher_prob, None  # the teacher learns from hard labels only
    trainer.fit(module, datamodule=RouterData(prep, tc.batch_size))
    module.load_state_dict(_best_state(trainer, ckpt))
    net.float().eval()  # float32 whatever train.precision trained it in
    with torch.no_grad():
        prep.teacher_prob = torch.sigmoid(net(torch.from_numpy(prep.teacher_emb))).numpy()
    return net


def fit_student(prep: Prepared, cfg: Config, workdir: Path, callbacks=(), logger=False,
                monitor: str = "val_loss") -> tuple[nn.Module, ModelCheckpoint]:
    """Distil the configured student from the teacher. Returns the best (lowest val loss) net."""
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    net = build_student(cfg.student, vocab_size=load_tokenizer(tokenizer_file(cfg.teacher.path)).get_vocab_size(),
                        n_models=len(prep.models), teacher=cfg.teacher.path)
    t = cfg.train
    module = RouterModule(net, t.lr, t.weight_decay, t.distill_weight, t.repr_weight,
                          prep.teacher_emb.shape[1], prep.pair, contrast_weight=t.contrast_weight)
    trainer, ckpt = _trainer(cfg, workdir / "student", callbacks, logger, monitor)
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
        batch = _collate([{"ids": ids[r], "target": prep.target[r]} for r in rows[i:i + batch_size]])
        h = net.features(batch["input_ids"], batch["attention_mask"])
        hs.append(h.numpy())
        ps.append(torch.sigmoid(with_prior(net, h)).numpy())
    if not hs:
        return np.zeros((0, net.feature_dim), np.float32), np.zeros((0, len(prep.models)), np.float32)
    return np.concatenate(hs), np.concatenate(ps)


# ----------------------------------------------------------------------------- decisions + metrics

def decision_rules(prep: Prepared, p_val: np.ndarray) -> dict:
    """Thresholds for strong-call fractions (pair) and λ for cost budgets (N models), from validation."""
    from .metrics import calibrate_lambdas, calibrate_thresholds, realised_fractions

    rules: dict = {"kind": "pair" if len(prep.models) == 2 else "multi"}
    if prep.battles is not None:  # trained as per-prompt Bradley-Terry strengths (RouterModule._battle_loss)
        rules["win_probability"] = "sigmoid(logit_a - logit_b)"
    if prep.pair is not None:
        scores = pair_score(p_val, prep.pair)
        thresholds = calibrate_thresholds(scores)
        rules.update(weak=prep.models[prep.pair[0]], strong=prep.models[prep.pair[1]],
                     score="(1 + p_strong - p_weak) / 2", thresholds=thresholds, default_strong_fraction=0.5)
        # Tied scores (identical prompts, or a template the student cannot see past) send all or none of
        # a tie to strong: say which targets validation could not meet, with what it realised instead.
        missed = {k: round(v, 4) for k, v in realised_fractions(scores, thresholds).items()
                  if abs(v - float(k)) > UNREACHABLE_TOLERANCE}
        if missed:
            rules["unreachable_fractions"] = missed
            console.print(f"[yellow]tied scores: strong shares {', '.join(missed)} cannot be met "
                          f"(validation realises {', '.join(map(str, missed.values()))})[/]")
    if len(prep.models) > 2:
        costs = routing.fill_unknown_costs(prep.costs)
        rules["costs_assumed"] = any(c is None for c in prep.costs)
        rules["cost_lambdas"] = calibrate_lambdas(p_val, costs)
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
    """Routing metrics of probabilities `p` (aligned with `rows`) for the pair, plus mean BCE."""
    from .metrics import routing_metrics

    t, m = prep.target[rows], prep.mask[rows]
    eps = 1e-6
    bce = -(t * np.log(p + eps) + (1 - t) * np.log(1 - p + eps))
    out = {"bce": float((bce * m).sum() / max(m.sum(), 1))}
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
    from .metrics import apgr  # noqa: F401  (fail early if the metrics module is missing)

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
            console.print(f"[bold]student[/] {cfg.student.family} dim={cfg.student.dim}")
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
        for sub in ("teacher", "student"):  # Lightning's own best checkpoints, kept for resuming/inspection
            shutil.rmtree(tmp / sub / "lightning_logs", ignore_errors=True)
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
    cfg = load_config(base=meta["config"])
    vocab = load_tokenizer(meta["tokenizer"]["source"]).get_vocab_size()
    student = build_student(cfg.student, vocab, len(meta["models"]), cfg.teacher.path, pretrained_init=False)
    state = torch.load(path / "student.pt", weights_only=True)
    if "prior.centroids" in state:
        from .prior import ClusterPrior

        k, dim = state["prior.centroids"].shape
        student.prior = ClusterPrior.empty(k, dim, len(meta["models"]))
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
