"""bench/quality.py: goals against the best baseline, and the tables written from results."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).parents[1] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def _apgr(x):
    return {"apgr": x, "cpt50": 0.3, "cpt80": 0.5}


def _pair_row(dataset="gsm8k", seeds=(0.70, 0.66)):
    routers = {"router (student)": _apgr(seeds[0]), "teacher": _apgr(0.66), "tfidf_lr": _apgr(0.636),
               "knn": _apgr(0.605), "mf": _apgr(0.566), "cluster": _apgr(0.65), "length": _apgr(0.6),
               "random": _apgr(0.5), "oracle": _apgr(1.06)}
    return {"dataset": dataset, "student": "static", "kind": "apgr", "goal": 0.67, "config": None, "overrides": [],
            "routers": routers, "pair": {"n": 276}, "seed_apgr": list(seeds), "train_seconds": 8.5}


def _multi_row():
    q = {"router (student)": 0.53, "teacher": 0.52, "best_single": 0.504, "tfidf_ridge": 0.522, "knn": 0.51,
         "cluster": 0.515, "oracle": 0.714}
    gap = {k: (v - 0.504) / (0.714 - 0.504) for k, v in q.items()}
    return {"dataset": "routerdc", "student": "static", "kind": "multi", "goal": None, "config": None,
            "overrides": [], "seed_multi": [0.53, 0.56],
            "multi": {"n": 4234, "n_models": 7, "best_single_model": "d", "quality": q, "gap_closed": gap}}


def test_goals_are_the_best_baseline_plus_the_margin_on_the_seed_mean():
    target, met = quality.baseline_goal(_pair_row(), "apgr")
    assert target == pytest.approx(0.65 + quality.MARGIN)  # the cluster router is the best baseline here
    assert met is True  # mean of 0.70 and 0.66 = 0.68 ≥ 0.67
    assert quality.baseline_goal(_pair_row(seeds=(0.70, 0.62)), "apgr")[1] is False
    assert quality.baseline_goal(_pair_row(), "multi") is None  # not this row's kind
    target, met = quality.baseline_goal(_multi_row(), "multi")
    assert target == pytest.approx(0.542) and met is True  # mean over seeds 0.545; seed 0 alone (0.53) is not
    win = {"dataset": "alpacaeval", "kind": "win", "seed_win_accuracy": [0.93],
           "win_accuracy": {"router (student)": 0.93, "bradley_terry": 0.927, "knn": 0.90, "cluster": float("nan")}}
    assert quality.baseline_goal(win, "win") == (pytest.approx(0.947), False)


def test_write_tables_with_goals(tmp_path):
    path = tmp_path / "quality.md"
    old = _pair_row("mtbench")  # a row written before the new columns: no cluster, no kind
    del old["routers"]["cluster"], old["kind"]
    old["goal"] = None
    quality.write([_pair_row(), old, _multi_row()], path)
    text = path.read_text()
    assert "| gsm8k (276 prompts) | static | default | 0.700 | 0.680 [0.660, 0.700] (2) |" in text
    assert "| ≥ 0.67 | yes | ≥ 0.670 | yes |" in text
    assert "| 0.566 | - | 0.600 |" in text  # the old row has no cluster APGR
    assert "## N models" in text and "| routerdc | static | default | 4234 | 7 | 0.530 |" in text
    assert "## Pairwise" not in text
    assert "![student against the baselines of each goal](quality.png)" in text
    from PIL import Image

    with Image.open(tmp_path / "quality.png") as png:  # one panel per judged static row: two here
        assert png.size[0] > png.size[1] > 100
    (tmp_path / "quality.png").unlink()
    quality.write([{**_pair_row(), "student": "transformer"}], path)  # nothing of the shipped student to draw
    assert not (tmp_path / "quality.png").exists() and "![" not in path.read_text()


def test_goal_summary_lists_each_goal_of_the_static_rows(tmp_path):
    path = tmp_path / "quality.md"
    transformer = _pair_row() | {"student": "transformer"}
    quality.write([_pair_row(seeds=(0.70, 0.62)), transformer, _multi_row()], path)
    text = path.read_text()
    summary = text.split("## Goals")[1].split("## Weak")[0]
    assert "| gsm8k | APGR ≥ 0.67 | 0.660 (mean of 2) | **no** |" in summary
    assert "| gsm8k | APGR ≥ best baseline (cluster 0.650) + 0.02 = 0.670 | 0.660 (mean of 2) | **no** |" in summary
    assert ("| routerdc | routed mean outcome ≥ best baseline (tfidf_ridge 0.522) + 0.02 = 0.542 | "
            "0.545 (mean of 2) | yes |") in summary
    assert summary.count("| gsm8k |") == 2  # the transformer row is not a goal of the shipped student
    assert "1 of 3 met" in summary


def test_render_rewrites_the_tables_from_the_results_file(tmp_path, monkeypatch):
    import json
    import sys

    (tmp_path / "quality.json").write_text(json.dumps([_pair_row(), _multi_row()]))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--render", "--out", str(tmp_path)])
    quality.main()
    text = (tmp_path / "quality.md").read_text()
    assert "| gsm8k (276 prompts) | static | default | 0.700 |" in text and "3 of 3 met" in text


def test_readme_tables_are_the_committed_results():
    """The README's quality tables are written from bench/results/quality.json, not copied by hand: a
    results file and a README that disagree fail here (rerun `python bench/quality.py --render`)."""
    root = Path(__file__).parents[1]
    results = json.loads((root / "bench" / "results" / "quality.json").read_text())
    readme = (root / "README.md").read_text()
    between = readme.split(quality.BEGIN)[1].split(quality.END)[0]
    assert between.strip() == quality.readme_block(results).strip()
    assert "| mmlu | APGR ≥ 0.70 |" in between  # the goals table is among them


def test_update_readme_rewrites_only_what_stands_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{quality.BEGIN}\nstale table\n{quality.END}\n\nafter\n")
    quality.update_readme([_pair_row(), _multi_row()], readme)
    text = readme.read_text()
    assert "stale table" not in text
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{quality.END}\n\nafter\n")
    assert "| gsm8k (276 prompts) | static | default | 0.700 | 0.680 [0.660, 0.700] (2) |" in text
    assert "| gsm8k | APGR ≥ 0.67 | 0.680 (mean of 2) | yes |" in text
    assert "Pairwise" not in text  # no pairwise rows, no caption
    once = readme.read_text()
    quality.update_readme([_pair_row(), _multi_row()], readme)
    assert readme.read_text() == once  # rewriting is idempotent
    readme.write_text("# Title\n\nno markers\n")
    with pytest.raises(SystemExit, match="needs one line"):
        quality.update_readme([_pair_row()], readme)
