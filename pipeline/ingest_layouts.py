"""The three input layouts (pairwise, long, wide; pipeline/ingest.py documents them) read into
`Observations`: one entry per (row, model) outcome, whatever the layout. Rows that cannot be used are
marked in `Drops` with the first reason that applies; input that cannot be read at all (a missing
column, an unknown winner value, a 0-1 model with a few cells outside 0-1) is a `DataError`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .common import ConfigError, DataError
from .ingest_columns import as_float, category_codes

LAYOUTS = ("pairwise", "wide", "long")
WINNERS = {"model_a": (1.0, False), "model_b": (0.0, False), "tie": (0.5, False), "tie (bothbad)": (0.5, True)}
# Other spellings of a tie where both answers were bad: the same outcome, never a guess at an unknown one.
WINNER_SPELLINGS = {"both_bad": "tie (bothbad)", "tie (both bad)": "tie (bothbad)", "tie_bothbad": "tie (bothbad)"}
ARENA_FLAGS = ("winner_model_a", "winner_model_b", "winner_tie")
# AlpacaEval's annotations: `instruction`, `generator_1` / `generator_2` with their `output_1` / `output_2`, and a
# `preference` of 1 (output_1 better), 2 (output_2 better), 0 or 1.5 (a draw), or between 1 and 2 from a weighted
# judge (P(output_2 better) + 1), read as its side as AlpacaEval's discrete win rate does.
ALPACA_EVAL = ("generator_1", "generator_2", "preference")
ALPACA_EVAL_ANSWERS = ("output_1", "output_2", "raw_completion")
# Per-side answers are not prompt metadata. Without a `prompt` column, the user turns of a chat stand for
# it: `conversation_a` (MT-Bench human judgments, Chatbot Arena conversations) or `messages` (chat-format sets).
IGNORED_PAIRWISE = ("response_a", "response_b", "conversation_a", "conversation_b")
CONVERSATION = "conversation_a"
MESSAGES = "messages"
WIDE_SUFFIXES = ("|total_cost", "|model_response")  # the only '|' columns of the wide layout (RouterBench)
# A model with at least OUTLIER_MIN_REST outcomes in [0, 1] and at most OUTLIER_SHARE of them outside is a 0-1
# model with bad cells (an error); otherwise the values are a scale of their own, which label normalises.
OUTLIER_SHARE, OUTLIER_MIN_REST = 0.05, 20


@dataclass
class Observations:
    """The layout-independent middle: one entry per usable (row, model) outcome."""

    models: list[str]
    row: np.ndarray  # input row of each observation (int64)
    model: np.ndarray  # model index (int64)
    value: np.ndarray  # raw outcome (float64)
    cost: Optional[np.ndarray] = None  # per-observation cost, NaN unknown
    battles: Optional[dict] = None  # pairwise: rows, a, b, score_a, bothbad
    metadata: list[str] = field(default_factory=list)


class Drops:
    """Per-row drop reasons; the first reason that applies to a row is the one counted."""

    def __init__(self, n: int):
        self.code = np.full(n, -1, np.int64)
        self.reasons: list[str] = []

    def add(self, mask: np.ndarray, reason: str) -> None:
        mask = np.asarray(mask, bool) & (self.code < 0)
        if mask.any():
            if reason not in self.reasons:
                self.reasons.append(reason)
            self.code[mask] = self.reasons.index(reason)

    @property
    def kept(self) -> np.ndarray:
        return self.code < 0


def require_columns(table: pa.Table, columns, layout: str, path, or_else: str = "") -> None:
    """A DataError naming the first of `columns` the table lacks (`or_else`: what may stand in for it)."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"missing required column {missing[0]!r}{or_else} for the {layout} layout "
                        f"(columns: {', '.join(table.column_names)}); --rename OLD={missing[0]} gives a column that "
                        "name", file=path)


def prompt_stand_in(columns: list[str], layout: str) -> Optional[str]:
    """The chat column whose user turns are the prompt when there is no `prompt` column, if any."""
    if "prompt" in columns:
        return None
    return next((c for c in ((CONVERSATION, MESSAGES) if layout == "pairwise" else (MESSAGES,)) if c in columns), None)


def detect_layout(columns: list[str]) -> str:
    """pairwise when model_a/model_b (or AlpacaEval's generator_1/generator_2/preference) are there, long when
    model/score are, otherwise wide."""
    cols = set(columns)
    if {"model_a", "model_b"} <= cols or set(ALPACA_EVAL) <= cols:
        return "pairwise"
    if {"model", "score"} <= cols:
        return "long"
    return "wide"


def alpaca_eval_as_pairwise(table: pa.Table, where) -> pa.Table:
    """An AlpacaEval annotations table in the pairwise columns, or `table` as it is when it is not one (or
    already names model_a/model_b): generator_1/generator_2 become model_a/model_b, the preference a winner
    (a missing one stays missing, a value outside 0, 1-2 is a DataError), `instruction` the prompt when
    there is no `prompt`; the answers, the judge's raw completion and the preference itself (an outcome,
    not metadata) are dropped."""
    cols = table.column_names
    if not set(ALPACA_EVAL) <= set(cols) or {"model_a", "model_b"} & set(cols):
        return table
    preference, non_numeric = as_float(table.column("preference"))
    bad = np.flatnonzero(non_numeric | ~(np.isnan(preference) | (preference == 0)
                                         | ((preference >= 1) & (preference <= 2))))
    if bad.size:
        first = int(bad[0])
        value = repr(table.column("preference")[first].as_py()) if non_numeric[first] else f"{preference[first]:g}"
        raise DataError(f"AlpacaEval preference {value} is not 1 or 2 (a side), 0 or 1.5 (a draw) or between "
                        "1 and 2 (a weighted judge)", file=where, row=first + 1)
    winner = np.where(np.isnan(preference), None, np.where((preference == 0) | (preference == 1.5), "tie",
                                                           np.where(preference < 1.5, "model_a", "model_b")))
    names = {"generator_1": "model_a", "generator_2": "model_b"}
    if "prompt" not in cols and "instruction" in cols:
        names["instruction"] = "prompt"
    drop = {"preference", "winner", *ALPACA_EVAL_ANSWERS}  # the winner is the preference's
    keep = [c for c in cols if c not in drop]
    out = table.select(keep).rename_columns([names.get(c, c) for c in keep])
    return out.append_column("winner", pa.array(winner.tolist(), pa.string()))


def is_arena(table: pa.Table) -> bool:
    """A pairwise table in the Chatbot-Arena-55k encoding: 0/1 winner flags, prompts as JSON lists of turns."""
    return all(c in table.column_names for c in ARENA_FLAGS)


def read_observations(table: pa.Table, layout: str, drops: Drops, where, models: Optional[list[str]]) -> Observations:
    """The outcomes of `table` read in `layout` (`models`: the wide layout's model columns, else detected)."""
    if layout == "pairwise":
        return _pairwise(table, drops, where)
    obs = _long(table, drops, where) if layout == "long" else _wide(table, drops, where, models)
    _check_outliers(obs, drops.kept[obs.row], layout, where, models)
    return obs


def _winner_scores(column, models, a, b, drops: Drops, where) -> tuple[np.ndarray, np.ndarray]:
    """Model a's score (1, 0.5, 0; NaN missing) and the both-bad flag of each battle from its winner value.

    A winner is a side (model_a, model_b), a tie, or the name of one of the row's two models, as some
    vote exports write it; a name that is neither of the row's models is an unknown value, never a guess."""
    codes, values = category_codes(column)
    known = [WINNERS.get(WINNER_SPELLINGS.get(v.lower(), v.lower()), (np.nan, False)) for v in values]
    known.append((np.nan, False))  # code -1: missing
    score_a = np.array([k[0] for k in known])[codes]
    bothbad = np.array([k[1] for k in known])[codes]
    names = np.array(models + [None], object)
    winner = np.array(values + [None], object)[codes]
    by_name = np.isnan(score_a) & (codes >= 0)  # a value that is no side and no tie: a model's name?
    is_a, is_b = by_name & (winner == names[a]), by_name & (winner == names[b])
    score_a[is_a], score_a[is_b] = 1.0, 0.0
    unknown_rows = np.flatnonzero(by_name & ~is_a & ~is_b)
    if unknown_rows.size:  # report the earliest row with an unknown value, and that value first
        first = int(unknown_rows[0])
        value = winner[first]
        rest = list(dict.fromkeys(v for v in winner[unknown_rows] if v != value))
        others = f"; other unknown values: {', '.join(map(repr, rest[:5]))}" if rest else ""
        raise DataError(f"unknown winner value {value!r} (expected one of {', '.join(WINNERS)}, "
                        f"{', '.join(WINNER_SPELLINGS)} for the last, or the name of the row's model_a or "
                        f"model_b{others})", file=where, row=first + 1)
    drops.add(codes < 0, "missing winner")
    return score_a, bothbad


def _pairwise(table: pa.Table, drops: Drops, where) -> Observations:
    arena = is_arena(table)
    # (the prompt, or the conversation that stands for it, is checked by ingest_canonical.build_dataset)
    require_columns(table, ["model_a", "model_b"] + ([] if arena else ["winner"]), "pairwise", where)
    a, names_a = category_codes(table.column("model_a"))
    b, names_b = category_codes(table.column("model_b"))
    models = sorted(set(names_a) | set(names_b))
    remap_a = np.array([models.index(m) for m in names_a] + [-1], np.int64)
    remap_b = np.array([models.index(m) for m in names_b] + [-1], np.int64)
    a, b = remap_a[a], remap_b[b]  # -1 stays -1 through the appended sentinel
    drops.add((a < 0) | (b < 0), "missing model")
    drops.add(a == b, "same model on both sides")
    n = table.num_rows
    if arena:
        flags = np.stack([as_float(table.column(c))[0] for c in ARENA_FLAGS], axis=1)
        missing = np.isnan(flags).any(axis=1)
        drops.add(missing, "missing winner")
        valid = np.isin(np.nan_to_num(flags), (0.0, 1.0)).all(axis=1) & (np.nan_to_num(flags).sum(axis=1) == 1)
        bad = np.flatnonzero(~missing & ~valid & drops.kept)
        if bad.size:
            raise DataError(f"winner flags {', '.join(ARENA_FLAGS)} must have exactly one 1, got "
                            f"{flags[bad[0]].tolist()}", file=where, row=int(bad[0]) + 1)
        score_a = np.where(flags[:, 0] == 1, 1.0, np.where(flags[:, 1] == 1, 0.0, 0.5))
        bothbad = np.zeros(n, bool)
    else:
        score_a, bothbad = _winner_scores(table.column("winner"), models, a, b, drops, where)
    cost_a = as_float(table.column("cost_a"))[0] if "cost_a" in table.column_names else None
    cost_b = as_float(table.column("cost_b"))[0] if "cost_b" in table.column_names else None
    rows = np.arange(n, dtype=np.int64)
    obs = Observations(models=models, row=np.concatenate([rows, rows]), model=np.concatenate([a, b]),
                       value=np.concatenate([score_a, 1.0 - score_a]))
    if cost_a is not None or cost_b is not None:
        nan = np.full(n, np.nan)
        obs.cost = np.concatenate([cost_a if cost_a is not None else nan, cost_b if cost_b is not None else nan])
    obs.battles = {"row": rows, "a": a, "b": b, "score_a": score_a, "bothbad": bothbad}
    skip = {"prompt", "model_a", "model_b", "winner", "cost_a", "cost_b", *ARENA_FLAGS, *IGNORED_PAIRWISE}
    obs.metadata = [c for c in table.column_names if c not in skip]
    return obs


def _long(table: pa.Table, drops: Drops, where) -> Observations:
    require_columns(table, ["prompt", "model", "score"], "long", where)
    model, models = category_codes(table.column("model"))
    drops.add(model < 0, "missing model")
    score, non_numeric = as_float(table.column("score"))
    drops.add(non_numeric, "non-numeric score")
    drops.add(np.isnan(score), "missing score")
    drops.add(~np.isfinite(score), "infinite score")
    obs = Observations(models=models, row=np.arange(table.num_rows, dtype=np.int64), model=model, value=score)
    if "cost" in table.column_names:
        obs.cost = as_float(table.column("cost"))[0]
    obs.metadata = [c for c in table.column_names if c not in ("prompt", "model", "score", "cost")]
    return obs


def _id_like(name: str) -> bool:
    """`id`, `sample_id`, `question-idx`, `qid`, `sampleId`...: identifiers, not outcomes."""
    return bool(re.fullmatch(r"(.*[_\-\s.])?(id|ids|idx|index|uid|qid|pid|row)", name.lower())
                or re.search(r"[a-z]Id$", name))


def _wide_models(table: pa.Table) -> list[str]:
    """The documented detection rule for model columns (docstring of pipeline/ingest.py)."""
    names = table.column_names
    cost_prefixes = [c[: -len("|total_cost")] for c in names if c.endswith("|total_cost")]
    if any(p in names for p in cost_prefixes):
        return [p for p in cost_prefixes if p in names]
    models = []
    for c in names:
        if c == "prompt" or "|" in c or _id_like(c):
            continue
        typ = table.column(c).type
        if pa.types.is_boolean(typ) or pa.types.is_floating(typ):
            models.append(c)
        elif pa.types.is_integer(typ):
            lo_hi = pc.min_max(table.column(c))
            lo, hi = lo_hi["min"].as_py(), lo_hi["max"].as_py()
            if lo is not None and lo >= 0 and hi <= 1:
                models.append(c)
            elif lo is not None and _zero_one_but_a_few(table.column(c).drop_null().to_numpy()):
                models.append(c)  # a model with bad cells, which _check_outliers reports
    return models


def _wide(table: pa.Table, drops: Drops, where, models: Optional[list[str]]) -> Observations:
    require_columns(table, ["prompt"], "wide", where)
    if models:
        require_columns(table, models, "wide", where)
        if len(set(models)) != len(models):
            raise ConfigError(f"models listed twice: {', '.join(models)}")
    else:
        odd = [c for c in table.column_names if "|" in c and not c.endswith(WIDE_SUFFIXES)]
        if odd:
            raise DataError(f"column {odd[0]!r} has a '|' but is not MODEL|total_cost or MODEL|model_response; in the "
                            "wide layout '|' marks those per-model columns, so rename it, or name the model columns "
                            "with --models (the others are then metadata)", file=where)
        models = _wide_models(table)
    if len(models) < 2:
        found = f"only {models[0]!r}" if models else "none"
        raise DataError(f"need at least two model outcome columns, found {found}; numeric or boolean columns "
                        f"are models unless id-like (columns: {', '.join(table.column_names)}); "
                        "name them with --models a,b. One row per prompt and model is the long layout: its "
                        "columns prompt, model, score (--rename OLD=NEW names them)", file=where)
    n = table.num_rows
    values = np.empty((n, len(models)))
    costs = np.full((n, len(models)), np.nan)
    non_numeric = np.zeros(n, bool)
    for j, m in enumerate(models):
        values[:, j], bad = as_float(table.column(m))
        non_numeric |= bad
        if f"{m}|total_cost" in table.column_names:
            costs[:, j] = as_float(table.column(f"{m}|total_cost"))[0]
    non_numeric |= np.isinf(values).any(axis=1)
    drops.add(non_numeric, "non-numeric score")
    drops.add(np.isnan(values).all(axis=1), "no outcome")
    rows, model = np.nonzero(~np.isnan(values))
    obs = Observations(models=list(models), row=rows.astype(np.int64), model=model.astype(np.int64),
                       value=values[rows, model])
    if any(f"{m}|total_cost" in table.column_names for m in models):
        obs.cost = costs[rows, model]
    used = set(models) | {f"{m}|total_cost" for m in models}
    obs.metadata = [c for c in table.column_names
                    if c != "prompt" and c not in used and not c.endswith("|model_response")
                    and not c.endswith("|total_cost")]
    return obs


def _zero_one_but_a_few(values: np.ndarray) -> bool:
    """Outcomes in [0, 1] but for a few: at most OUTLIER_SHARE of them outside, at least OUTLIER_MIN_REST
    inside, one of those below 1 (so a 1-10 judge column is never one)."""
    outside = (values < 0.0) | (values > 1.0)
    n_out = int(outside.sum())
    return n_out <= max(1, OUTLIER_SHARE * values.size) and values.size - n_out >= OUTLIER_MIN_REST \
        and bool((values[~outside] < 1.0).any())


def _check_outliers(obs: Observations, keep: np.ndarray, layout: str, where, given_models=None) -> None:
    """A few outcomes outside [0, 1] in a model whose others are 0-1 (`_zero_one_but_a_few`): an error naming
    the column, row and value. Left in, one such cell would make label rescale every target of the dataset."""
    for j, model in enumerate(obs.models):
        mine = keep & (obs.model == j)
        values = obs.value[mine]
        outside = (values < 0.0) | (values > 1.0)
        n_out = int(outside.sum())
        if n_out == 0 or not _zero_one_but_a_few(values):
            continue
        rows = obs.row[mine][outside]
        first = int(np.argmin(rows))
        column = repr(model) if layout == "wide" else f"'score' of model {model!r}"
        more = f" ({n_out} such values)" if n_out > 1 else ""
        not_a_model = (f"; if {model!r} is not a model, name the model columns with --models"
                       if layout == "wide" and not given_models else "")
        raise DataError(f"column {column}: value {values[outside][first]:g} is outside the 0-1 range of its other "
                        f"{values.size - n_out:,} values{more}; fix the cell (or drop the row){not_a_model}",
                        file=where, row=int(rows[first]) + 1)
