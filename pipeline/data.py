"""What the networks train on: labels + teacher embeddings (`prepare`) and the DataModule that feeds them.

`prepare` aligns a labeled dataset by row (`Prepared`); with `train.group_by`, the fit targets are
smoothed toward their metadata group's rate (`group_smoothed`). `RouterData` serves train/val/test
batches, with token ids from the runtime's own encoder (`tokenize`) when the net reads text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .common import ConfigError, DataError, arrow_table, console, processed_dir, read_json
from .config import Config
from .encoders import teacher_embeddings, teacher_inputs, tokenizer_file
from .tokenization import encode, load_tokenizer, make_spec


# ----------------------------------------------------------------------------- prepared rows

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
    templates: dict | None = None  # shared prefixes/suffixes of the train prompts (tokenization.compact_templates)
    battles: list[np.ndarray] | None = None  # pairwise data: per row, [k, 3] (model a, model b, a's score)
    group_columns: dict = field(default_factory=dict)  # train.group_by=auto: candidate column -> values
    tokens: dict = field(default_factory=dict)  # spec key -> (ids list, spec)

    def __post_init__(self):
        if self.fit_target is None:
            self.fit_target = self.target

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def prepare(name: str, cfg: Config) -> Prepared:
    """Load the labels and the (cached) teacher embeddings; with `train.group_by`, the smoothed fit targets."""
    from .ingest import list_matrix
    from .label import load_labels, training_split

    src = processed_dir(name).resolve()  # one version of the dataset, whatever an ingest does meanwhile
    ds, stats = load_labels(name, src)
    table = arrow_table(ds)
    models = list(stats["models"])
    manifest = read_json(src / "manifest.json")
    costs = [manifest.get("costs", {}).get(m) for m in models]
    pair = None
    if stats.get("pair"):
        pair = (models.index(stats["pair"]["weak"]), models.index(stats["pair"]["strong"]))
    prompts = table.column("prompt").to_pylist()
    prompt_ids = table.column("prompt_id").to_pylist()
    split = training_split(table.column("split").to_pylist(), prompt_ids, cfg)
    groups, group_columns = None, {}
    battles = _battles(src, prompt_ids)  # pairwise data: fitted on these, which smoothed targets never reach
    if battles is not None and cfg.train.group_by not in ("auto", None):
        raise ConfigError(f"train.group_by={cfg.train.group_by!r}: group smoothing applies to outcome targets, and "
                          f"{name!r} is pairwise data, fitted on its battles; leave train.group_by at auto or null")
    if cfg.train.group_by == "auto":  # candidates for select.choose_group_by (none for pairwise data)
        from .select import group_candidates

        known = [c for c in manifest.get("metadata_columns", []) if c in table.column_names] if battles is None else []
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
                                                    cfg.teacher.batch_size, cfg.teacher.device, job=cfg.train,
                                                    pooling=cfg.teacher.pooling),
        data_hash=stats.get("content_hash", manifest.get("content_hash", "")), stats=stats,
        templates=templates, battles=battles, group_columns=group_columns,
    )
    if groups is not None:
        prep.fit_target = group_smoothed(prep.target, prep.mask, groups, split == "train",
                                         cfg.train.group_smoothing)
    return prep


def _battles(dataset_dir: Path, prompt_ids: list[str]) -> list[np.ndarray] | None:
    """Pairwise data: each labeled prompt's battles as rows (model a, model b, a's score); else None."""
    path = dataset_dir / "battles"
    if not path.exists():
        return None
    from datasets import load_from_disk

    table = arrow_table(load_from_disk(str(path)))
    row_of = {pid: j for j, pid in enumerate(prompt_ids)}
    rows = np.array([row_of.get(pid, -1) for pid in table.column("prompt_id").to_pylist()])
    abs_ = np.stack([table.column(c).to_numpy().astype(np.float32) for c in ("model_a", "model_b", "score_a")], 1)
    keep = rows >= 0
    rows, abs_ = rows[keep], abs_[keep]
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(len(prompt_ids) + 1))
    return [abs_[order[bounds[i]:bounds[i + 1]]] for i in range(len(prompt_ids))]


def flat_battles(battles: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-prompt battles (as in `Prepared.battles`) as flat arrays: each battle's position in `battles`
    (its prompt), model a, model b and a's score."""
    row = np.repeat(np.arange(len(battles)), [len(x) for x in battles])
    flat = np.concatenate(battles) if len(row) else np.zeros((0, 3), np.float32)
    return row, flat[:, 0].astype(np.int64), flat[:, 1].astype(np.int64), flat[:, 2].astype(np.float64)


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


# ----------------------------------------------------------------------------- tokens + loaders

def token_spec(cfg: Config, prep: Prepared | None = None) -> dict:
    """The runtime's tokenization spec for the configured student, with `prep`'s templates if it learned any."""
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


def collate(items: list[dict]) -> dict:
    """Stack rows into a batch: token ids padded with an attention mask, battles as dense pair targets."""
    batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0] if k not in ("ids", "battles")}
    if "battles" in items[0]:  # pairwise data: per-prompt battle outcomes as dense [b, m, m] pair targets
        m = items[0]["target"].shape[0]
        score = np.zeros((len(items), m, m), dtype=np.float32)
        count, wins = np.zeros_like(score), np.zeros_like(score)
        for j, it in enumerate(items):
            a, b, s = it["battles"][:, 0].astype(int), it["battles"][:, 1].astype(int), it["battles"][:, 2]
            np.add.at(score[j], (a, b), s)
            np.add.at(score[j], (b, a), 1 - s)
            np.add.at(count[j], (a, b), 1)
            np.add.at(count[j], (b, a), 1)
            decided = s != 0.5  # [winner, loser] of the decided battles, for the validation win prediction
            np.add.at(wins[j], (np.where(s > 0.5, a, b)[decided], np.where(s > 0.5, b, a)[decided]), 1)
        batch["pair_target"] = torch.from_numpy(score / np.maximum(count, 1))
        batch["pair_weight"] = torch.from_numpy((count > 0).astype(np.float32))
        batch["battle_wins"] = torch.from_numpy(wins)
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
                          shuffle=shuffle, collate_fn=collate, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)
