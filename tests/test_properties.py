"""Property tests: generated preference files with bad rows and broken files never cost data silently.

Every generated file either ingests, with each bad row dropped and counted by reason in the manifest
(rows used + rows dropped == rows in), or fails with exit code 2 naming the file (and the row or line
where one is at fault). A failure leaves nothing behind; a success leaves exactly the dataset, which
`label` then turns into targets without crashing.

The generator knows which rows it made bad, so each example is checked against an oracle: a row is
`clean` (must be used), `bad` (must be dropped) or `either` (its fate depends on how a file type
stores the value, e.g. a prompt that is a number is text in CSV but not in JSON).
"""
from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.common import prompt_hash, read_json
from pipeline.label import split_of

from .leftovers import leftovers, visible

NAME = "case"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
FILE_TYPES = ("csv", "jsonl", "json", "parquet")
LAYOUTS = ("long", "pairwise", "wide")
MODELS = ("m1", "m2", 7)  # 7: a model named by a number (text in CSV, a mixed-type column in JSON)
# duplicates across rows, also as copies that differ only in surrounding whitespace (one prompt: `prompt_key`)
POOL = ("What is 2+2?", "Name a bird, please.", 'Say "hi", then stop; ok', "What is 2+2?\n", "  Name a bird, please. ")
MEGABYTE = "long prompt " * 90_000  # ~1 MB
ALPHABET = st.characters(codec="utf-8", categories=("L", "N", "P", "Zs"), exclude_characters="\r\x85\u2028\u2029")
WINNERS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}

CLEAN, BAD, EITHER = "clean", "bad", "either"


@dataclass
class Case:
    """A generated input: its rows, the oracle's verdict per row and the fault of the whole file."""

    layout: str
    ftype: str
    columns: list[str]
    rows: list[dict]
    status: list[str]
    wide_models: list[str] = field(default_factory=list)
    fault: str | None = None  # a fault of the whole file, see FAULTS
    cut: float = 0.5  # where a truncated file ends, as a fraction of its bytes
    unknown_winner_row: int | None = None  # 1-based

    def __repr__(self) -> str:  # short: a 1 MB prompt in a failure report helps nobody
        def short(v):
            return v[:40] + f"...({len(v):,} chars)" if isinstance(v, str) and len(v) > 60 else v
        rows = [{k: short(v) for k, v in r.items()} for r in self.rows]
        return (f"Case({self.layout}, {self.ftype}, fault={self.fault}, columns={self.columns},\n  rows={rows},\n"
                f"  status={self.status})")

    def _repr_pretty_(self, printer, cycle):  # what Hypothesis prints for a failing example
        printer.text(repr(self))

    @property
    def exact(self) -> bool:
        """No row and no file property whose fate the oracle leaves open."""
        return self.fault is None and EITHER not in self.status


# --- values ---------------------------------------------------------------------------------------


def _weighted(*choices):
    """One of (weight, strategy) choices; shrinks towards the first."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda k: table[k])


def _prompt():
    clean = st.one_of(st.sampled_from(POOL), st.text(ALPHABET, min_size=1, max_size=20).filter(str.strip))
    return _weighted((16, clean.map(lambda p: (p, CLEAN))),
                     (3, st.sampled_from(["", "   ", " \n\t ", None]).map(lambda p: (p, BAD))),
                     (1, st.integers(0, 99).map(lambda p: (p, EITHER))))


def _model():
    return _weighted((9, st.sampled_from(MODELS).map(lambda m: (m, CLEAN))),
                     (1, st.sampled_from([None, "", "  "]).map(lambda m: (m, BAD))))


def _score():
    clean = st.one_of(st.integers(0, 1), st.booleans(), st.floats(-10, 20, allow_nan=False),
                      st.floats(-1e30, 1e30, allow_nan=False))
    bad = st.sampled_from([None, math.nan, math.inf, -math.inf, 1e39, "high", "n/a"])
    return _weighted((15, clean.map(lambda v: (v, CLEAN))), (4, bad.map(lambda v: (v, BAD))),
                     (1, st.just(("0.5", EITHER))))


def _winner():
    return _weighted((18, st.sampled_from([*WINNERS, "Model_A", " tie ", "TIE (BOTHBAD)"])),
                     (2, st.sampled_from([None, "", "  "])), (1, st.sampled_from(["A", "win"])))


def _cell():
    """A wide-layout outcome cell: observed (0/1 or a fraction), not observed, or making the row bad."""
    return _weighted((12, st.sampled_from([0, 1, 0.25, 0.75]).map(lambda v: (v, CLEAN))),
                     (5, st.just((None, "missing"))),
                     (2, st.sampled_from([math.inf, -math.inf, 1e39]).map(lambda v: (v, BAD))),
                     (1, st.just(("high", "text"))))


def _worst(*statuses: str) -> str:
    return BAD if BAD in statuses else EITHER if EITHER in statuses else CLEAN


@st.composite
def cases(draw, layout: str | None = None, fault: str | None = None) -> Case:
    layout, ftype = layout or draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(FILE_TYPES))
    n = draw(st.integers(1, 10))
    rows, status, ambiguous = [], [], False
    wide_models = ["m1", "m2", "m3"][: draw(st.integers(2, 3))]
    for _ in range(n):
        prompt, s_prompt = draw(_prompt())
        if layout == "long":
            (model, s_model), (score, s_score) = draw(_model()), draw(_score())
            rows.append({"prompt": prompt, "model": model, "score": score})
            status.append(_worst(s_prompt, s_model, s_score))
        elif layout == "pairwise":
            (a, s_a), (b, s_b) = draw(_model()), draw(_model())
            winner = draw(_winner())
            s_same = BAD if s_a == s_b == CLEAN and str(a) == str(b) else CLEAN
            s_winner = BAD if winner is None or not winner.strip() else CLEAN
            rows.append({"prompt": prompt, "model_a": a, "model_b": b, "winner": winner})
            status.append(_worst(s_prompt, s_a, s_b, s_same, s_winner))
        else:
            cells = [draw(_cell()) for _ in wide_models]
            s_cells = [s for _, s in cells]
            s_none = BAD if all(s == "missing" for s in s_cells) else CLEAN
            rows.append({"prompt": prompt, **{m: v for m, (v, _) in zip(wide_models, cells)}})
            status.append(_worst(s_prompt, s_none, *(s for s in s_cells if s in (BAD, EITHER))))
            # A text cell can turn its whole column into metadata. And JSON has no infinity: Python
            # writes `Infinity`, which `datasets` reads as inf unless a column of the file has mixed
            # types (a number among text prompts); then it re-encodes every record and inf becomes
            # null, so the cell is "not observed" instead of dropping the row.
            ambiguous |= "text" in s_cells or (ftype in ("json", "jsonl") and s_prompt == EITHER)
    if ambiguous:
        status = [EITHER] * len(status)
    if draw(st.booleans()):  # metadata, including names of label's output columns
        meta = draw(st.sampled_from(["topic", "split", "target"]))
        for i, row in enumerate(rows):
            row[meta] = draw(st.sampled_from(["math", "chat", None]))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    case = Case(layout, ftype, columns, rows, status, wide_models)
    if layout == "pairwise":
        unknown = [i for i, r in enumerate(rows) if r["winner"] in ("A", "win")]
        case.unknown_winner_row = unknown[0] + 1 if unknown else None
    case.fault = fault
    case.cut = draw(st.floats(0.02, 0.98))
    return case


# --- files ----------------------------------------------------------------------------------------


def _parquet_column(values: list):
    """One Arrow column; a mixed-type column is stored as text, as a spreadsheet export would."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values],
                        pa.string())


def write_file(case: Case, folder: Path) -> Path:
    path = folder / f"input.{case.ftype}"
    cols = case.columns
    rows = [{c: r[c] for c in cols if c in r} for r in case.rows]
    if case.ftype == "csv":
        pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in cols}).to_csv(path, index=False)
    elif case.ftype == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif case.ftype == "json":
        path.write_text("[" + ",\n".join(json.dumps(r) for r in rows) + "]\n")
    else:
        schema_free = {c: _parquet_column([r.get(c) for r in rows]) for c in cols}
        pq.write_table(pa.table(schema_free), path)
    return path


# Faults of a whole file. Each returns the text the error must contain (None: the file may also ingest).
def _drop_column(case: Case, folder: Path) -> str:
    keys = {"long": ["prompt", "model", "score"], "pairwise": ["prompt", "model_a", "model_b", "winner"],
            "wide": ["prompt"]}[case.layout]
    gone = keys[len(case.rows) % len(keys)]
    case.columns = [c for c in case.columns if c != gone]
    write_file(case, folder)
    return ""


def _rename_column(case: Case, folder: Path) -> str:
    case.rows = [{("Prompt" if k == "prompt" else k): v for k, v in r.items()} for r in case.rows]
    case.columns = ["Prompt" if c == "prompt" else c for c in case.columns]
    write_file(case, folder)
    return "missing required column 'prompt'"


def _one_model(case: Case, folder: Path) -> str:
    for r in case.rows:
        for key in ("model", "model_a", "model_b"):
            if key in r:
                r[key] = "m1"
        for m in case.wide_models[1:]:
            r.pop(m, None)
    case.columns = [c for c in case.columns if c not in case.wide_models[1:]]
    write_file(case, folder)
    return ""


def _zero_rows(case: Case, folder: Path) -> str:
    path = folder / f"input.{case.ftype}"
    if case.ftype == "csv":
        path.write_text(",".join(case.columns) + "\n")
    elif case.ftype == "jsonl":
        path.write_text("")
    elif case.ftype == "json":
        path.write_text("[]\n")
    else:
        pq.write_table(pa.table({c: pa.array([], pa.string()) for c in case.columns}), path)
    return ""


def _invalid_utf8(case: Case, folder: Path) -> str:
    if case.ftype == "parquet":  # Arrow strings are UTF-8 by construction; only text files can be broken
        case.fault = "truncate"
        return _truncate(case, folder)
    row = len(case.rows) // 2
    case.rows[row] = {**case.rows[row], "note": "@@BAD@@"}
    case.columns = case.columns + ["note"]
    path = write_file(case, folder)
    raw = path.read_bytes()
    line = raw[: raw.index(b"@@BAD@@")].count(b"\n") + 1
    path.write_bytes(raw.replace(b"@@BAD@@", b"caf\xe9 \xff"))
    return f"not valid UTF-8 text (line {line})"


def _truncate(case: Case, folder: Path) -> None:
    path = write_file(case, folder)
    raw = path.read_bytes()
    path.write_bytes(raw[: max(1, int(len(raw) * case.cut))])
    return None


FAULTS = {"drop_column": _drop_column, "rename_column": _rename_column, "one_model": _one_model,
          "zero_rows": _zero_rows, "invalid_utf8": _invalid_utf8, "truncate": _truncate}


# --- the oracle -----------------------------------------------------------------------------------


def _name(model) -> str:
    return str(model).strip()


def _value(v) -> float:
    return float(v)


def _key(prompt: str) -> str:
    """Texts that are one prompt have one key: ingest's rule (`ingest_canonical.prompt_key`) in plain Python."""
    return prompt.replace("\r\n", "\n").strip()


def expected_observations(case: Case) -> dict[tuple[str, str], list[float]]:
    """(prompt key, model) -> the outcomes of the clean rows: what the dataset must average."""
    obs = defaultdict(list)
    for row, s in zip(case.rows, case.status):
        if s != CLEAN:
            continue
        p = _key(row["prompt"])
        if case.layout == "long":
            obs[p, _name(row["model"])].append(_value(row["score"]))
        elif case.layout == "pairwise":
            score_a = WINNERS[row["winner"].strip().lower()]
            obs[p, _name(row["model_a"])].append(score_a)
            obs[p, _name(row["model_b"])].append(1.0 - score_a)
        else:
            for m in case.wide_models:
                if row.get(m) is not None:
                    obs[p, m].append(_value(row[m]))
    return obs


def check_failure(case: Case, path: Path, code: int, out: str, must_contain: str | None, data_dir: Path) -> None:
    assert code == 2, out
    assert "error:" in out and str(path) in out and "Traceback" not in out, out
    if must_contain:
        assert must_contain in out, out
    assert not data_dir.exists() or not any(data_dir.rglob("*")), list(data_dir.rglob("*"))


def check_dataset(case: Case, code: int, out: str, data_dir: Path, rows_written: int) -> dict:
    """Invariants of an accepted file, and the oracle where it is exact. Returns the manifest."""
    assert code == 0, out
    out_dir = data_dir / "processed" / NAME
    assert visible(data_dir / "processed") == [NAME]
    assert not leftovers(data_dir), leftovers(data_dir)
    m = read_json(out_dir / "manifest.json")
    n_in, used, dropped = m["n_rows_in"], m["n_rows_used"], m["dropped"]
    assert n_in <= rows_written if case.fault == "truncate" else n_in == rows_written
    assert used + sum(dropped.values()) == n_in and used > 0
    assert set(m["dropped_rows"]) == set(dropped) and all(c > 0 for c in dropped.values())
    for reason, first in m["dropped_rows"].items():
        assert first == sorted(first) and len(first) == min(dropped[reason], 5) and all(1 <= r <= n_in for r in first)
        assert f"{reason} (rows {', '.join(map(str, first))}" in out
    ds = datasets.load_from_disk(str(out_dir / "dataset")).with_format("numpy")
    outcome, mask, count = (np.stack(list(ds[c])) for c in ("outcome", "mask", "count"))
    prompts = list(ds["prompt"])
    assert len(ds) == m["n_prompts"] and len(set(map(_key, prompts))) == len(prompts)
    assert list(ds["prompt_id"]) == [prompt_hash(p)[:16] for p in prompts]
    assert outcome.shape == (len(ds), len(m["models"])) and len(m["models"]) >= 2
    assert np.isfinite(outcome).all() and (mask == (count > 0)).all() and mask.any(axis=1).all() and mask.any(axis=0).all()
    lo, hi = m["outcome_range"]
    assert (outcome[mask] >= lo - 1e-6 * max(1, abs(lo))).all() and (outcome[mask] <= hi + 1e-6 * max(1, abs(hi))).all()
    if case.layout == "pairwise":
        assert count.sum() == 2 * m["n_battles"] and m["n_battles"] == used
    elif case.layout == "long":
        assert count.sum() == used
    if case.exact:
        clean = [i + 1 for i, s in enumerate(case.status) if s == CLEAN]
        assert used == len(clean), (case.status, dropped)
        assert not set(r for first in m["dropped_rows"].values() for r in first) & set(clean)
        expected = expected_observations(case)
        got = {(_key(p), model): (outcome[i, j], count[i, j]) for i, p in enumerate(prompts)
               for j, model in enumerate(m["models"]) if mask[i, j]}
        assert set(got) == set(expected)
        for key, values in expected.items():
            assert got[key][1] == len(values)
            # float64 sums in another order: allow rounding relative to the largest value averaged
            assert got[key][0] == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6 * max(1, *map(abs, values)))
    return m


def check_labels(code: int, out: str, data_dir: Path, manifest: dict, fractions=(0.2, 0.1)) -> None:
    """`label` on an accepted dataset: targets in [0, 1], masks as ingested, the hash split."""
    if code == 2:  # the one refusal that an accepted dataset can earn: a constant off-scale outcome
        assert "nothing to learn" in out and "Traceback" not in out, out
        assert not (data_dir / "processed" / NAME / "labels").exists()
        return
    assert code == 0, out
    base = datasets.load_from_disk(str(data_dir / "processed" / NAME / "dataset")).with_format("numpy")
    lab = datasets.load_from_disk(str(data_dir / "processed" / NAME / "labels" / "dataset")).with_format("numpy")
    target, mask = np.stack(list(lab["target"])), np.stack(list(lab["mask"]))
    assert (mask == np.stack(list(base["mask"]))).all()
    assert np.isfinite(target).all() and (target >= 0).all() and (target <= 1).all() and (target[~mask] == 0).all()
    assert list(lab["split"]) == [split_of(p, *fractions) for p in lab["prompt"]]
    assert np.isfinite(lab["difficulty"]).all()
    stats = read_json(data_dir / "processed" / NAME / "labels" / "label_stats.json")
    assert sum(stats["splits"].values()) == len(lab) == manifest["n_prompts"]
    weak, strong = (stats["models"].index(stats["pair"][k]) for k in ("weak", "strong"))
    assert (np.isnan(lab["soft_label"]) == ~(mask[:, weak] & mask[:, strong])).all()
    assert not leftovers(data_dir)


def expected_failure(case: Case) -> str | None:
    """Text the error must contain when the oracle says the file must fail; None when it may pass."""
    if case.unknown_winner_row is not None:
        return f"row {case.unknown_winner_row}: unknown winner value"
    if not case.exact:
        return None
    models = {model for (_, model) in expected_observations(case)}
    return "" if len(models) < 2 else None


# --- the properties -------------------------------------------------------------------------------


def _ingest(cli, case: Case, path: Path):
    return cli("ingest", path, "--name", NAME)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_rows_are_dropped_and_counted_and_label_never_crashes(layout, cli, monkeypatch):
    @settings(max_examples=15, **SETTINGS)
    @given(case=cases(layout), options=LABEL_OPTIONS)
    def check(case, options):
        _rows_property(case, options, cli, monkeypatch)

    check()


# label options that change the targets or the split: tiers, binarising threshold, relaxation, fractions
LABEL_OPTIONS = st.fixed_dictionaries({
    "tiers": st.sampled_from([2, 3, 5]), "threshold": st.sampled_from([None, 0.0, 0.5, 1.0]),
    "relaxation": st.sampled_from([0.0, 0.3]),
    "fractions": st.sampled_from([(0.2, 0.1), (0.0, 0.0), (0.9, 0.5)])})


def _rows_property(case: Case, options: dict, cli, monkeypatch) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        monkeypatch.setenv("PREROUTER_DATA_DIR", str(data_dir))
        monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp / "models"))
        path = write_file(case, tmp)
        code, out = _ingest(cli, case, path)
        must_fail = expected_failure(case)
        event(f"{'exact' if case.exact else 'open'} {case.layout}: {'ingested' if code == 0 else 'exit 2'}")
        if must_fail is not None or code != 0:
            check_failure(case, path, code, out, must_fail, data_dir)
            assert must_fail is not None or not case.exact, out
            return
        manifest = check_dataset(case, code, out, data_dir, len(case.rows))
        test, val = options["fractions"]
        args = [f"label.tiers={options['tiers']}", f"label.relaxation={options['relaxation']}",
                f"label.test_fraction={test}", f"label.val_fraction={val}"]
        args += [] if options["threshold"] is None else [f"label.threshold={options['threshold']}"]
        code, out = cli("label", NAME, *(a for arg in args for a in ("--set", arg)))
        check_labels(code, out, data_dir, manifest, (test, val))
        assert not (tmp / "models").exists()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_broken_files_fail_with_exit_2_or_ingest_consistently(fault, cli, monkeypatch):
    @settings(max_examples=6, **SETTINGS)
    @given(case=cases(fault=fault))
    def check(case):
        _fault_property(case, cli, monkeypatch)

    check()


def _fault_property(case: Case, cli, monkeypatch) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        monkeypatch.setenv("PREROUTER_DATA_DIR", str(data_dir))
        rows_written = len(case.rows)
        must_contain = FAULTS[case.fault](case, tmp)
        path = tmp / f"input.{case.ftype}"
        code, out = _ingest(cli, case, path)
        event(f"{case.fault}: {'ingested' if code == 0 else 'exit 2'}")
        if must_contain is None and code == 0:
            check_dataset(case, code, out, data_dir, rows_written)
        else:
            check_failure(case, path, code, out, must_contain, data_dir)


# --- the cases behind fixes, spelled out --------------------------------------------------------


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_megabyte_prompts_in_every_file_type(ftype, data_dir, tmp_path, cli):
    rows = [{"prompt": MEGABYTE, "model": "m1", "score": 1}, {"prompt": MEGABYTE, "model": "m2", "score": 0},
            {"prompt": "short", "model": "m1", "score": 0}, {"prompt": "short", "model": "m2", "score": 1}]
    case = Case("long", ftype, ["prompt", "model", "score"], rows, [CLEAN] * 4)
    code, out = cli("ingest", write_file(case, tmp_path), "--name", NAME)
    manifest = check_dataset(case, code, out, data_dir, 4)
    assert manifest["n_prompts"] == 2
    check_labels(*cli("label", NAME), data_dir, manifest)


def test_input_columns_named_like_label_outputs_are_kept_as_source_columns(data_dir, tmp_path, cli):
    prompts = [f"question {i}" for i in range(40)]
    df = pd.DataFrame({"prompt": prompts, "m1": [i % 2 for i in range(40)], "m2": [1] * 40,
                       "split": ["train"] * 40, "target": ["x"] * 40, "difficulty": ["hard"] * 40})
    df.to_csv(tmp_path / "w.csv", index=False)
    assert cli("ingest", tmp_path / "w.csv", "--name", NAME)[0] == 0
    manifest = read_json(data_dir / "processed" / NAME / "manifest.json")
    assert manifest["models"] == ["m1", "m2"]
    assert manifest["metadata_columns"] == ["source_split", "source_target", "source_difficulty"]
    check_labels(*cli("label", NAME), data_dir, manifest)  # the split is the hash rule's, not the input's
    lab = datasets.load_from_disk(str(data_dir / "processed" / NAME / "labels" / "dataset"))
    assert set(lab["split"]) == {"train", "val", "test"} and set(lab["source_split"]) == {"train"}


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_infinite_and_beyond_float32_scores_drop_the_row(ftype, data_dir, tmp_path, cli):
    rows = [{"prompt": "a", "m1": 1, "m2": 0}, {"prompt": "b", "m1": 0, "m2": 1e39},
            {"prompt": "c", "m1": math.inf, "m2": 1}, {"prompt": "d", "m1": 0.5, "m2": None}]
    case = Case("wide", ftype, ["prompt", "m1", "m2"], rows, [CLEAN, BAD, BAD, CLEAN], ["m1", "m2"])
    code, out = cli("ingest", write_file(case, tmp_path), "--name", NAME)
    manifest = check_dataset(case, code, out, data_dir, 4)
    assert manifest["dropped_rows"] == {"non-numeric score": [2, 3]} and manifest["outcome_range"] == [0, 1]
    check_labels(*cli("label", NAME), data_dir, manifest)


def test_blank_and_numeric_model_names_in_mixed_json(data_dir, tmp_path, cli):
    lines = [{"prompt": "a", "model": " m1", "score": 1}, {"prompt": "a", "model": 7, "score": 0},
             {"prompt": "b", "model": "m1 ", "score": 0}, {"prompt": "b", "model": "  ", "score": 1}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    code, out = cli("ingest", tmp_path / "l.jsonl", "--name", NAME)
    assert code == 0, out
    manifest = read_json(data_dir / "processed" / NAME / "manifest.json")
    assert manifest["models"] == ["7", "m1"] and manifest["dropped_rows"] == {"missing model": [4]}


def test_unknown_winner_error_names_the_earliest_row(data_dir, tmp_path, cli):
    path = tmp_path / "p.csv"
    path.write_text("prompt,model_a,model_b,winner\nhi,a,b,model_a\nyo,a,b,win\nzz,a,b,A\n")
    code, out = cli("ingest", path)
    assert code == 2 and f"{path}, row 2: unknown winner value 'win'" in out and "other unknown values: 'A'" in out
    assert not data_dir.exists() or not any(data_dir.rglob("*"))


@pytest.mark.parametrize("ftype", ["json", "parquet"])
def test_zero_row_files_say_so(ftype, data_dir, tmp_path, cli):
    case = Case("long", ftype, ["prompt", "model", "score"], [], [])
    _zero_rows(case, tmp_path)
    code, out = cli("ingest", tmp_path / f"input.{ftype}")
    assert code == 2 and "the file has no rows" in out, out
