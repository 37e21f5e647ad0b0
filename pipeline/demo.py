"""A seeded synthetic preference set, written in all three input layouts.

The project ships no third-party data, so `prerouter demo-data` makes a small world in which a
router has something to learn.

Generative story (one draw per prompt, shared by the three files):

1. Family. Each prompt belongs to one of five task families - math, code, trivia, writing,
   reasoning - chosen uniformly. A family has a base difficulty (`BASE_DIFFICULTY`): math and
   code are hard, trivia and writing easy.
2. Text. The prompt is a template of its family with random slots, optionally wrapped in
   filler context sentences (0-6) and a closing instruction, so lengths vary from a few words to
   a hundred or so.
3. Latent difficulty = base[family]
                     + sum of the bumps of the hard keywords present (`KEYWORD_BUMPS`: "prove",
                       "step by step", "optimize", "edge cases"...)
                     + 0.5 * (words - 25) / 25   (longer prompts are harder)
                     + Normal(0, 0.3) noise.
4. Models. Three models with per-family skills (`SKILLS`) and a price per 1k tokens (`PRICES`):
   `small-7b` is cheap and good at trivia and writing but weak at math and code, `large-70b` is
   expensive and good at everything, `medium-34b` sits between. Model m succeeds on a prompt with
   probability sigmoid(skill_m[family] - difficulty).
5. Cost of one call = price_m * (prompt tokens + 200 output tokens) / 1000, tokens = 1.3 * words.

The three files:

- wide CSV (`demo_wide.csv`): `sample_id, prompt, family`, one boolean correctness column per model
  (the Bernoulli draw of step 4) and RouterBench-style `<model>|total_cost` columns.
- long JSONL (`demo_long.jsonl`): one line per prompt and model with a 1-10 judge `score`
  = round(1 + 9 * sigmoid(skill - difficulty + Normal(0, 0.5))), its `cost` and `family`.
- pairwise Parquet (`demo_pairwise.parquet`): two battles per prompt between random model pairs,
  decided by the same correctness draws as the wide file: one right and one wrong -> the right one
  wins; both right -> `tie`; both wrong -> `tie (bothbad)`. Per-side costs in `cost_a`, `cost_b`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FAMILIES = ("math", "code", "trivia", "writing", "reasoning")
MODELS = ("small-7b", "medium-34b", "large-70b")
PRICES = {"small-7b": 0.0002, "medium-34b": 0.0008, "large-70b": 0.0025}  # $ per 1k tokens
SKILLS = {  # model -> skill per family, in FAMILIES order
    "small-7b": (-1.2, -0.6, 2.2, 1.9, -0.4),
    "medium-34b": (0.4, 0.7, 2.4, 2.1, 0.6),
    "large-70b": (1.8, 2.0, 2.7, 2.4, 1.9),
}
BASE_DIFFICULTY = {"math": 0.6, "code": 0.5, "trivia": -0.6, "writing": -0.4, "reasoning": 0.3}
KEYWORD_BUMPS = {"prove": 1.0, "step by step": 0.4, "optimize": 0.7, "edge cases": 0.6,
                 "rigorous": 0.8, "in under": 0.3, "obscure": 0.9, "paradox": 0.7}
OUTPUT_TOKENS = 200

_SLOTS = {
    "topic": ["autumn", "the sea", "a lost key", "city lights", "friendship", "a broken clock",
              "the first snow", "a quiet library", "an old photograph", "migration"],
    "person": ["my landlord", "a new colleague", "the hiring manager", "a neighbour", "my professor"],
    "country": ["France", "Kenya", "Peru", "Japan", "Canada", "Norway", "Egypt", "Chile", "Vietnam"],
    "book": ["Moby-Dick", "War and Peace", "Beloved", "Dune", "Middlemarch", "Things Fall Apart"],
    "lang": ["Python", "JavaScript", "Rust", "Go", "C++"],
    "task": ["reverses a linked list", "parses ISO dates", "merges two sorted arrays",
             "counts word frequencies in a file", "validates an email address",
             "finds the longest palindromic substring", "implements an LRU cache"],
    "thing": ["squirrels", "poets", "engineers", "musicians", "gardeners", "pilots"],
    "adj": ["obscure", "famous", "ancient", "modern"],
}
_TEMPLATES = {
    "math": ["What is {a} times {b}?", "Solve for x: {a}x + {b} = {c}.",
             "Prove that the sum of the first {a} odd numbers is {a} squared.",
             "A train travels {a} km in {b} hours. What is its average speed?",
             "Compute the integral of x^{b} from 0 to {a}.",
             "Give a rigorous proof that there are infinitely many primes congruent to {b} mod {c}."],
    "code": ["Write a {lang} function that {task}.", "Write a {lang} function that {task} and handles edge cases.",
             "Optimize this {lang} loop that {task}; it runs in O(n^2).",
             "Explain what a {lang} program that {task} does, line by line."],
    "trivia": ["What is the capital of {country}?", "Who wrote {book}?",
               "Name an {adj} fact about {country}.", "In which continent is {country}?",
               "What is the official language of {country}?"],
    "writing": ["Write a short poem about {topic}.", "Draft a polite email to {person} about {topic}.",
                "Write a two-sentence story about {topic}.", "Suggest a title for an essay on {topic}.",
                "Rewrite this sentence more formally: I think {topic} is kind of great."],
    "reasoning": ["If all {thing} are clever and some clever beings are {thing2}, are some {thing} {thing2}?",
                  "Alice is older than Bob and Bob is older than {a} of his cousins. Who is youngest?",
                  "Resolve the paradox: a barber shaves everyone who does not shave themselves.",
                  "You have {a} boxes and {b} keys; each key opens exactly one box. How many tries in the worst case?"],
}
_FILLER = ["I am preparing for an exam next week.", "This is for a side project of mine.",
           "My friend and I disagree about this.", "Please keep the answer concise.",
           "Some background: I have been reading about this topic for a while.",
           "I tried to work it out myself but got stuck.", "Context matters here, so read carefully.",
           "It would help if you could also mention any common mistakes.",
           "I need this for a presentation tomorrow morning."]
_CLOSERS = ["", "", "Explain step by step.", "Answer in under fifty words.", "Be brief.",
            "Show your reasoning step by step."]


def _prompt(rng: np.random.Generator, family: str) -> str:
    template = _TEMPLATES[family][rng.integers(len(_TEMPLATES[family]))]
    slots = {k: v[rng.integers(len(v))] for k, v in _SLOTS.items()}
    slots["thing2"] = _SLOTS["thing"][rng.integers(len(_SLOTS["thing"]))]
    a, b = rng.integers(2, 999, size=2)
    slots.update(a=int(a), b=int(b), c=int(rng.integers(2, 50)))
    core = template.format(**slots)
    filler = list(rng.choice(_FILLER, size=rng.integers(0, 7), replace=False))
    closer = _CLOSERS[rng.integers(len(_CLOSERS))]
    return " ".join(filler[: len(filler) // 2] + [core] + filler[len(filler) // 2:] + [closer]).strip()


def difficulty(prompt: str, family: str) -> float:
    """The noiseless latent difficulty of step 3 (exposed so tests can check the story)."""
    text = prompt.lower()
    bumps = sum(v for k, v in KEYWORD_BUMPS.items() if k in text)
    return BASE_DIFFICULTY[family] + bumps + 0.5 * (len(prompt.split()) - 25) / 25


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate(out: Path, n_prompts: int = 3000, seed: int = 0) -> dict[str, Path]:
    """Write demo_wide.csv, demo_long.jsonl and demo_pairwise.parquet under `out`; same seed, same bytes."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    fam_idx = rng.integers(len(FAMILIES), size=n_prompts)
    families = [FAMILIES[i] for i in fam_idx]
    prompts = [_prompt(rng, f) for f in families]
    diff = np.array([difficulty(p, f) for p, f in zip(prompts, families)]) + rng.normal(0, 0.3, n_prompts)
    skill = np.array([[SKILLS[m][i] for m in MODELS] for i in fam_idx])  # [n_prompts, n_models]
    logit = skill - diff[:, None]
    correct = rng.random(logit.shape) < _sigmoid(logit)
    tokens = 1.3 * np.array([len(p.split()) for p in prompts]) + OUTPUT_TOKENS
    cost = np.round(tokens[:, None] * np.array([PRICES[m] for m in MODELS]) / 1000, 8)
    judge = np.clip(np.rint(1 + 9 * _sigmoid(logit + rng.normal(0, 0.5, logit.shape))), 1, 10).astype(int)

    wide = pd.DataFrame({"sample_id": np.arange(n_prompts), "prompt": prompts, "family": families})
    for j, m in enumerate(MODELS):
        wide[m] = correct[:, j]
    for j, m in enumerate(MODELS):
        wide[f"{m}|total_cost"] = cost[:, j]
    paths = {"wide": out / "demo_wide.csv", "long": out / "demo_long.jsonl", "pairwise": out / "demo_pairwise.parquet"}
    wide.to_csv(paths["wide"], index=False)

    long = pd.DataFrame({
        "prompt": np.repeat(prompts, len(MODELS)), "model": np.tile(MODELS, n_prompts),
        "score": judge.ravel(), "cost": cost.ravel(), "family": np.repeat(families, len(MODELS)),
    })
    long.to_json(paths["long"], orient="records", lines=True, force_ascii=False)

    # Two battles per prompt between distinct random models.
    rows = np.repeat(np.arange(n_prompts), 2)
    a = rng.integers(len(MODELS), size=rows.size)
    b = (a + rng.integers(1, len(MODELS), size=rows.size)) % len(MODELS)
    ca, cb = correct[rows, a], correct[rows, b]
    winner = np.where(ca & ~cb, "model_a", np.where(cb & ~ca, "model_b", np.where(ca, "tie", "tie (bothbad)")))
    names = np.array(MODELS)
    pq.write_table(pa.table({
        "prompt": pa.array([prompts[i] for i in rows]), "model_a": names[a], "model_b": names[b],
        "winner": winner, "cost_a": cost[rows, a], "cost_b": cost[rows, b],
        "family": pa.array([families[i] for i in rows]),
    }), paths["pairwise"])
    return paths
