"""Seeded synthetic pairwise data for `bench/scale.py`: battles for the ingest-only measurement and
topic-structured prompts (with per-topic model skills and costs) for the whole pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_MODELS = 50  # the ingest-only battles
WORDS = ("explain write compute prove summarize translate compare design debug list describe why how what "
         "model data graph prime string function poem essay email market theory cell river planet war "
         "history algorithm vector matrix network protein language music city law").split()


def make_battles(path: Path, rows: int, seed: int = 0) -> None:
    """A seeded pairwise parquet: `rows` battles, N_MODELS models, rows // 10 distinct prompts."""
    rng = np.random.default_rng(seed)
    n_prompts = max(rows // 10, 1)
    words = np.array(WORDS)
    lengths = rng.integers(10, 81, size=n_prompts)
    pool = [f"#{i} " + " ".join(words[rng.integers(len(words), size=k)]) for i, k in enumerate(lengths)]
    strength = np.linspace(-2, 2, N_MODELS)
    a = rng.integers(N_MODELS, size=rows)
    b = (a + rng.integers(1, N_MODELS, size=rows)) % N_MODELS
    p_a = 1 / (1 + np.exp(strength[b] - strength[a]))
    u = rng.random(rows)
    winner = np.where(u < 0.1, "tie", np.where(u < 0.1 + 0.9 * p_a, "model_a", "model_b"))
    names = np.array([f"model-{i:02d}" for i in range(N_MODELS)])
    table = pa.table({
        "prompt": pa.array(pool).take(pa.array(rng.integers(n_prompts, size=rows))),
        "model_a": names[a], "model_b": names[b], "winner": winner,
    })
    pq.write_table(table, path, row_group_size=100_000)


TOPICS = {
    "math": "integral derivative prime theorem proof equation matrix vector probability polynomial geometry "
            "triangle limit series convergence eigenvalue algebra modular lemma inequality logarithm fraction",
    "code": "python function class bug compile runtime error stack array pointer recursion loop thread async "
            "api database query index regex test refactor memory exception",
    "science": "cell protein gene enzyme molecule atom electron photon gravity orbit planet climate carbon "
               "reaction energy entropy quantum evolution species virus bacteria neuron",
    "history": "empire war treaty revolution dynasty king queen colony republic senate medieval ancient battle "
               "parliament constitution independence migration trade plague crusade",
    "writing": "poem story essay novel character plot dialogue metaphor rhyme verse chapter narrator tone draft "
               "edit headline letter speech sonnet haiku",
    "business": "market revenue profit budget invoice tax customer sales strategy startup investor equity loan "
                "interest inflation pricing contract supplier forecast quarter",
    "health": "diet exercise sleep symptom fever headache vitamin calorie muscle injury therapy dose allergy "
              "heart blood pressure stress anxiety recovery",
    "travel": "flight hotel visa passport itinerary museum beach mountain train luggage airport restaurant "
              "currency weather tour island city map hostel",
}
COMMON = ("the a an of to in for with on about and or but that this my your is are was can should would how "
          "why what when which please explain describe write list compare summarize give show help me best "
          "way difference between example simple detailed short step").split()
OPENERS = ("Explain", "Write", "How do I", "Why does", "Compare", "Summarize", "Can you help me with",
           "What is the difference between", "Give me an example of", "List", "Fix", "Plan")
BATTLES_PER_PROMPT = 5


def make_pairwise(path: Path, n_prompts: int, n_models: int, battles_per_prompt: int = BATTLES_PER_PROMPT,
                  seed: int = 0) -> dict:
    """A seeded pairwise parquet (prompt, model_a, model_b, winner, cost_a, cost_b): `n_prompts` distinct
    prompts, `battles_per_prompt` battles each between two distinct random models, rows shuffled.

    A prompt has a topic; its 10-120 words (log-normal around 40) are 55% from the topic's vocabulary,
    10% from another topic's and 35% common words, after an opener. Model m's skill on topic t is
    strength[m] + Normal(0, 0.8) (strengths evenly spaced in [-1.5, 1.5]), plus 0.5 * strength[m] *
    (words - 40) / 40 on the prompt: stronger models gain on long prompts. A battle is a tie with
    probability 0.1, else won by a with probability sigmoid(skill_a - skill_b). A call costs
    price[m] * (1.3 * words + 200) / 1e6, prices log-spaced from 0.1 to 10 per 1M tokens by strength."""
    rng = np.random.default_rng(seed)
    topic_words = [np.array(v.split()) for v in TOPICS.values()]
    common = np.array(COMMON)
    n_topics = len(topic_words)
    topic = rng.integers(n_topics, size=n_prompts)
    length = np.clip(np.rint(rng.lognormal(np.log(40), 0.6, size=n_prompts)), 10, 120).astype(int)
    total = int(length.sum())
    owner = np.repeat(topic, length)
    source = rng.random(total)
    other = (owner + rng.integers(1, n_topics, size=total)) % n_topics
    pick = rng.random(total)
    words = np.empty(total, dtype=object)
    for t in range(n_topics):  # each word from its topic's vocabulary, another topic's, or the common words
        own, off = (owner == t) & (source < 0.55), (other == t) & (source >= 0.55) & (source < 0.65)
        words[own] = topic_words[t][(pick[own] * len(topic_words[t])).astype(int)]
        words[off] = topic_words[t][(pick[off] * len(topic_words[t])).astype(int)]
    rest = source >= 0.65
    words[rest] = common[(pick[rest] * len(common)).astype(int)]
    openers = rng.integers(len(OPENERS), size=n_prompts)
    ends = np.cumsum(length)
    prompts = [f"{OPENERS[o]} {' '.join(words[e - k:e])}{'?' if o % 3 == 2 else '.'}"
               for o, e, k in zip(openers, ends, length)]

    strength = np.linspace(-1.5, 1.5, n_models)
    skill = strength[:, None] + rng.normal(0, 0.8, size=(n_models, n_topics))
    price = np.logspace(-1, 1, n_models)  # per 1M tokens, the strongest model the priciest
    rows = rng.permutation(np.repeat(np.arange(n_prompts), battles_per_prompt))
    a = rng.integers(n_models, size=rows.size)
    b = (a + rng.integers(1, n_models, size=rows.size)) % n_models
    long = 0.5 * (length[rows] - 40) / 40
    margin = skill[a, topic[rows]] - skill[b, topic[rows]] + long * (strength[a] - strength[b])
    u = rng.random(rows.size)
    winner = np.where(u < 0.1, "tie", np.where(rng.random(rows.size) < 1 / (1 + np.exp(-margin)), "model_a", "model_b"))
    tokens = 1.3 * length[rows] + 200
    names = np.array([f"model-{i:02d}" for i in range(n_models)])
    pq.write_table(pa.table({
        "prompt": pa.array(prompts).take(pa.array(rows)), "model_a": names[a], "model_b": names[b],
        "winner": winner, "cost_a": np.round(price[a] * tokens / 1e6, 9),
        "cost_b": np.round(price[b] * tokens / 1e6, 9),
    }), path, row_group_size=100_000)
    return {"prompts": n_prompts, "battles": int(rows.size), "models": n_models, "mean_words": float(length.mean())}
