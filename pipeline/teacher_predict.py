"""Teacher embeddings spread over the processes of a distributed job, through Lightning's `Trainer.predict`.

When the training job runs as several processes (`train.devices` / `train.num_nodes`, Lightning's ddp
strategies) on the teacher's kind of device (`teacher.device`), `encoders.teacher_embeddings` hands the
prompts missing from the cache to `Trainer.predict` with the job's own layout. Every process of the job
calls it (under ddp Lightning runs the command once per process, and the first `predict` is where it
starts them). Rank 0's list of missing prompts, length-sorted, is broadcast so every rank splits the same
work; Lightning's sampler for predict gives each rank its share without repeating any prompt
(`UnrepeatedDistributedSampler`, unlike training's `DistributedSampler`, which pads); each rank embeds
its share in batches and `ShardWriter` writes them to the cache as shards (atomic, named by their prompt
ids, so ranks never write the same file); after a barrier every rank reads the merged cache.
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from . import encoders
from .common import console


def _columns(rows: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """A batch of (prompt id, text) rows as (ids, texts)."""
    ids, texts = zip(*rows)
    return list(ids), list(texts)


class TeacherEmbedder(pl.LightningModule):
    """The teacher's embedding pass as a predict step: L2-normalised mean-pooled embeddings of one batch.

    The teacher is loaded in `setup`, once the ranks have agreed on the work, and only where there is work."""

    def __init__(self, ids: list[str], texts: list[str], path: str | None, max_tokens: int, batch_size: int,
                 pooling: str):
        super().__init__()
        self.rows = list(zip(ids, texts))  # this process's view of the missing prompts, length-sorted
        self.path, self.max_tokens, self.batch_size, self.pooling = path, max_tokens, batch_size, pooling
        self.work: list[tuple[str, str]] = []
        self.tok = None
        self.encoder = None

    def setup(self, stage: str) -> None:
        rows = self.trainer.strategy.broadcast(self.rows, src=0)  # rank 0's list: every rank splits the same work
        world = self.trainer.world_size
        # Lightning's predict sampler needs a row for every rank or none at all; fewer rows than ranks are
        # left to the caller, which encodes what the cache still lacks in its own process
        self.work = rows if len(rows) >= world else []
        if self.work:
            self.tok, self.encoder = encoders.load_teacher(self.path)
            if self.trainer.is_global_zero:
                device = "cuda" if isinstance(self.trainer.accelerator, CUDAAccelerator) else "cpu"
                console.print(f"teacher embeddings: {len(self.work)} new prompts over {world} processes ({device})")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.work, batch_size=self.batch_size, shuffle=False, collate_fn=_columns)

    def predict_step(self, batch: tuple[list[str], list[str]]) -> tuple[list[str], np.ndarray]:
        ids, texts = batch
        return ids, encoders.embed_batch(self.tok, self.encoder, texts, self.max_tokens, self.device, self.pooling)


class ShardWriter(BasePredictionWriter):
    """Writes each rank's embeddings to the cache every `shard_size` prompts, and its rest at the end."""

    def __init__(self, shard_dir: Path, shard_size: int):
        super().__init__(write_interval="batch")
        self.shards = encoders.ShardBuffer(shard_dir, shard_size)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self.shards.add(*prediction)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        self.shards.flush()


def predict_missing(ids: list[str], texts: list[str], shard_dir: Path, path: str | None, max_tokens: int,
                    batch_size: int, shard_size: int, device: str, job, pooling: str) -> bool:
    """Embed the (length-sorted) prompts over the processes of `job` (a TrainConfig: accelerator, devices,
    num_nodes, strategy) and write them to `shard_dir`. False, with nothing run, when the job is one process
    or runs on another kind of device than `device` (cpu or cuda). Every process of the job must call it."""
    writer = ShardWriter(shard_dir, shard_size)
    trainer = pl.Trainer(accelerator=job.accelerator, devices=job.devices, num_nodes=job.num_nodes,
                         strategy=job.strategy, precision="32-true", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=console.is_terminal, callbacks=[writer])
    kinds = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator}
    if trainer.world_size < 2 or not isinstance(trainer.accelerator, kinds[device]):
        return False
    shard_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws a seed: keep the caller's random stream
        trainer.predict(TeacherEmbedder(ids, texts, path, max_tokens, batch_size, pooling),
                        return_predictions=False)
    trainer.strategy.barrier("teacher-embeddings")  # every rank's shards are written before any reads the cache
    return True
