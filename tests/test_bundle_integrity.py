"""router.json cannot be bent: it is validated on load and sealed by `bundle_sha256` (a digest over every
file's sha256 and the canonical router.json). Every edit is the runtime's one-line bundle error, never a
traceback and never a silently different router; edits that change nothing load."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.bundle_contract import MAX_JSON_DEPTH, bundle_digest, canonical_router_json
from pipeline.common import DataError
from pipeline.runtime import Router

from .fabricate import tiny_bundle

REQUIRED = ("schema_version", "models", "tokenizer", "onnx", "decision", "files", "bundle_sha256")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, dict]:
    path, _ = tiny_bundle(tmp_path_factory.mktemp("integrity") / "bundle")
    return path, json.loads((path / "router.json").read_text())


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> tuple[Path, dict]:
    decision = {"kind": "multi", "cost_lambdas": {"0.25": 5.0, "0.5": 0.0}, "default_cost_weight": 0.3}
    path, _ = tiny_bundle(tmp_path_factory.mktemp("integrity") / "multi", n_models=3, decision=decision)
    return path, json.loads((path / "router.json").read_text())


def reseal(config: dict) -> dict:
    """The digest recomputed, as someone editing router.json on purpose would: only the structure checks are left."""
    try:
        config["bundle_sha256"] = bundle_digest(config)
    except Exception:  # `files` is no longer a name -> digest object: the structure check names it
        pass
    return config


def write(path: Path, config, text: str | None = None) -> None:
    (path / "router.json").write_text(text if text is not None else json.dumps(config, indent=2))


def load_error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        Router.load(path, **kw)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture
def bundle(pair, tmp_path) -> tuple[Path, dict]:
    """A fresh copy of the pair bundle to edit."""
    path = shutil.copytree(pair[0], tmp_path / "bundle")
    return path, copy.deepcopy(pair[1])


# -- each edit the issue found, one by one ----------------------------------------------------------

def test_a_bundle_as_exported_loads_and_verifies(pair):
    path, config = pair
    assert config["schema_version"] == 2 and config["bundle_sha256"] == bundle_digest(config)
    assert Router.load(path).route("hello") in ("weak", "strong")


def test_an_edited_threshold_breaks_the_seal(bundle):
    path, config = bundle
    config["decision"]["thresholds"]["0.5"] = 0.31  # plausible, but no longer what calibration chose
    write(path, config)
    assert "bundle_sha256 mismatch" in load_error(path)


def test_a_removed_or_added_model_is_refused_even_when_resealed(bundle):
    path, config = bundle
    removed = copy.deepcopy(config)
    removed["models"] = removed["models"][:1]
    write(path, reseal(removed))
    assert "models must be a list of at least 2 models" in load_error(path)
    renamed = copy.deepcopy(config)  # two outputs still, but router.json's second model is not the graph's
    renamed["models"].append({"name": "third", "cost": 2.0, "index": 2})
    write(path, reseal(renamed))
    assert "lists 3 models but the graph returns 2 outputs" in load_error(path)
    write(path, config)
    assert Router.load(path).models == ["weak", "strong"]


def test_files_key_is_required_when_verifying(bundle):
    path, config = bundle
    del config["files"]
    write(path, reseal(config))
    assert "required key missing: files" in load_error(path)
    Router.load(path, verify=False)  # the structure alone is fine


def test_a_graph_missing_from_files_cannot_be_swapped_in(bundle):
    path, config = bundle
    del config["files"]["model.int8.onnx"]
    write(path, reseal(config))
    assert "files does not list 'model.int8.onnx'" in load_error(path)


@pytest.mark.parametrize("where, value", [
    (("onnx", "int8"), "../outside.onnx"), (("onnx", "fp32"), "/etc/passwd"), (("onnx", "int8"), "sub/../../x.onnx"),
    (("tokenizer", "file"), "..\\tokenizer.json"), (("tokenizer", "file"), "C:/tokenizer.json"),
    (("onnx", "int8"), ""), (("onnx", "int8"), 3)])
def test_every_path_stays_inside_the_bundle(bundle, where, value):
    path, config = bundle
    config[where[0]][where[1]] = value
    write(path, reseal(config))
    assert f"{where[0]}.{where[1]}" in load_error(path, verify=False)


def test_a_symbolic_link_out_of_the_bundle_is_refused(bundle, tmp_path):
    path, config = bundle
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(path / "model.int8.onnx", outside)
    (path / "link.onnx").symlink_to(outside)
    config["onnx"]["int8"] = "link.onnx"
    write(path, reseal(config))
    assert "leaves the bundle folder" in load_error(path, verify=False)


def test_a_listed_file_outside_the_bundle_is_refused(bundle):
    path, config = bundle
    config["files"]["../secret"] = "0" * 64
    write(path, reseal(config))
    assert "files key '../secret' leaves the bundle folder" in load_error(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("decision"), "required key missing: decision"),
    (lambda c: c.__setitem__("models", {"weak": 0}), "models must be a list"),
    (lambda c: c["models"][0].__setitem__("index", "0"), "models[0].index must be an integer"),
    (lambda c: c["models"][1].__setitem__("index", 0), "indices must be 0..1"),
    (lambda c: c["models"][1].__setitem__("name", "weak"), "duplicate names"),
    (lambda c: c["models"][0].__setitem__("cost", -1), "models[0].cost"),
    (lambda c: c["tokenizer"].__setitem__("max_tokens", "32"), "tokenizer.max_tokens"),
    (lambda c: c["tokenizer"].__setitem__("head_tokens", 500), "exceed max_tokens"),
    (lambda c: c["tokenizer"].__setitem__("truncation", "middle"), "tokenizer.truncation"),
    (lambda c: c["decision"].__setitem__("kind", "cascade"), "kind 'cascade'"),
    (lambda c: c["decision"].__setitem__("strong", "gpt-9"), "unknown pair models ['gpt-9']"),
    (lambda c: c["decision"]["thresholds"].__setitem__("0.5", "0.5"), "decision.thresholds['0.5']"),
    (lambda c: c["decision"]["thresholds"].__setitem__("0.9", 0.8), "must not rise"),
    (lambda c: c["decision"]["thresholds"].__setitem__("half", 0.5), "key 'half'"),
    (lambda c: c["decision"].__setitem__("default_strong_fraction", 2), "default_strong_fraction"),
    (lambda c: c["decision"].__setitem__("thresholds", [0.5]), "decision.thresholds must be an object"),
    (lambda c: c.__setitem__("metrics", [1]), "metrics has the wrong type"),
    (lambda c: c.__setitem__("files", ["model.onnx"]), "files must be an object"),
    (lambda c: c["files"].__setitem__("model.onnx", "abc"), "files['model.onnx'] must be the sha256"),
    (lambda c: c.__setitem__("bundle_sha256", 5), "bundle_sha256 must be 64 hex digits"),
    (lambda c: c["metrics"].__setitem__("deep", json.loads("[" * 40 + "]" * 40)), "nests deeper than"),
])
def test_structure_errors_name_what_is_wrong(bundle, edit, message):
    path, config = bundle
    edit(config)
    write(path, config if message.startswith("bundle_sha256") else reseal(config))
    text = load_error(path)
    assert "router.json is invalid" in text and message in text, text


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nests deeper than"), ("[1, 2]", "schema_version None"),
    ("{not json", "not valid JSON"), ('{"schema_version": 2}\xff', "not valid JSON")])
def test_unreadable_router_json_is_a_bundle_error(bundle, text, message):
    path, _ = bundle
    (path / "router.json").write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text
                                       else text[:-1].encode() + b"\xff")
    assert message in load_error(path)


def test_a_bundle_from_before_the_seal_asks_to_be_re_exported(bundle):
    path, config = bundle
    config["schema_version"] = 1
    del config["bundle_sha256"]
    write(path, config)
    text = load_error(path)
    assert "schema_version 1" in text and "re-export" in text


def test_a_graph_that_is_not_onnx_is_a_bundle_error(bundle):
    path, config = bundle
    (path / "model.int8.onnx").write_bytes(b"not a model")
    assert "sha256 mismatch" in load_error(path)
    assert "not a usable ONNX graph" in load_error(path, verify=False)


def test_the_cli_prints_one_line_and_exits_2(bundle, cli):
    path, config = bundle
    config["models"].append({"name": "third", "cost": 2.0, "index": 2})
    write(path, config)
    code, out = cli("route", path, "hello")
    assert code == 2 and "bundle_sha256 mismatch" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


# -- property: any edit of router.json ---------------------------------------------------------------

def paths_of(obj, prefix=()):
    """Every (key path) in a JSON value, objects and lists alike."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths_of(v, (*prefix, i))


def get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.sampled_from(["../x", "/etc/passwd", "model.onnx", "weak", "strong", "0" * 64]),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def edits(draw, original: dict):
    """(edited config, whether the edit certainly makes the bundle unusable) from a handful of mutations."""
    config = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "retype", "threshold", "add_model", "remove_model", "deep", "traversal",
                                     "noop"]))
        paths = [p for p in paths_of(config) if p]
        if kind == "drop":
            p = draw(st.sampled_from(paths))
            parent = get(config, p[:-1])
            del parent[p[-1]]
        elif kind == "retype":
            p = draw(st.sampled_from(paths))
            get(config, p[:-1])[p[-1]] = draw(VALUES)
        elif kind == "threshold" and isinstance(config.get("decision"), dict) \
                and isinstance(config["decision"].get("thresholds"), dict) and config["decision"]["thresholds"]:
            key = draw(st.sampled_from(sorted(config["decision"]["thresholds"])))
            config["decision"]["thresholds"][key] = draw(st.one_of(st.floats(-1, 2), st.just(math.nan)))
        elif kind == "add_model" and isinstance(config.get("models"), list):
            config["models"].append({"name": draw(st.text(min_size=1, max_size=5)), "cost": 1.0,
                                     "index": len(config["models"])})
        elif kind == "remove_model" and isinstance(config.get("models"), list) and config["models"]:
            config["models"].pop(draw(st.integers(0, len(config["models"]) - 1)))
        elif kind == "deep":
            depth = draw(st.integers(MAX_JSON_DEPTH, 3 * MAX_JSON_DEPTH))
            nested = json.loads("[" * depth + "]" * depth)
            config["extra"] = nested
        elif kind == "traversal":
            target = draw(st.sampled_from([("onnx", "int8"), ("onnx", "fp32"), ("tokenizer", "file")]))
            if isinstance(config.get(target[0]), dict):
                config[target[0]][target[1]] = draw(st.sampled_from(["../model.onnx", "/tmp/model.onnx",
                                                                     "a/../../model.onnx", "..", "C:\\m.onnx"]))
        elif kind == "noop":  # rewrite a value with itself
            p = draw(st.sampled_from(paths))
            get(config, p[:-1])[p[-1]] = copy.deepcopy(get(config, p))
    return config, certainly_unusable(config, original)


def certainly_unusable(config: dict, original: dict) -> bool:
    """What the final edited config shows for sure (a later edit may undo an earlier one)."""
    def nesting(o) -> int:
        return 1 + max(map(nesting, o.values() if isinstance(o, dict) else o), default=0) \
            if isinstance(o, (dict, list)) else 0

    def escapes(rel) -> bool:
        return isinstance(rel, str) and (rel.startswith(("/", "C:")) or ".." in rel.replace("\\", "/").split("/"))

    return (any(k not in config for k in REQUIRED[:-1]) or nesting(config) > MAX_JSON_DEPTH
            or (isinstance(config["models"], list) and len(config["models"]) != len(original["models"]))
            or any(isinstance(config.get(a), dict) and escapes(config[a].get(b))
                   for a, b in (("onnx", "int8"), ("onnx", "fp32"), ("tokenizer", "file"))))


def check_edit(path: Path, original: dict, edited: dict, must_fail: bool, resealed: bool, text: str | None) -> None:
    write(path, edited, text)
    try:
        router = Router.load(path)
    except DataError as e:
        assert e.exit_code == 2 and "\n" not in str(e) and str(path) in str(e)
        if not resealed:
            assert canonical_router_json(edited) != canonical_router_json(original) or \
                   edited.get("bundle_sha256") != original["bundle_sha256"], str(e)
        return
    assert not must_fail
    if not resealed:  # only an edit that changes nothing loads
        assert canonical_router_json(edited) == canonical_router_json(original)
        assert edited["bundle_sha256"] == original["bundle_sha256"]
    # What loads is a working router whose outputs and models agree.
    assert router.scores(["hello", "world"]).shape == (2, len(router.models))
    assert router.route("a prompt") in router.models


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
@given(data=st.data(), resealed=st.booleans(), which=st.sampled_from(["pair", "multi"]))
def test_any_edit_of_router_json_is_refused_or_changes_nothing(pair, multi, tmp_path_factory, data, resealed, which):
    source, original = pair if which == "pair" else multi
    path = tmp_path_factory.getbasetemp() / f"edit-{which}"
    if not path.exists():
        shutil.copytree(source, path)
    edited, must_fail = data.draw(edits(original))
    if resealed:
        reseal(edited)
    check_edit(path, original, edited, must_fail, resealed, None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(indent=st.sampled_from([None, 0, 1, 4, "\t"]), ascii_only=st.booleans(), sort=st.booleans())
def test_reformatting_router_json_changes_nothing(pair, tmp_path_factory, indent, ascii_only, sort):
    source, original = pair
    path = tmp_path_factory.getbasetemp() / "reformat"
    if not path.exists():
        shutil.copytree(source, path)
    text = json.dumps(dict(reversed(list(original.items()))), indent=indent, ensure_ascii=ascii_only, sort_keys=sort)
    check_edit(path, original, original, False, False, text)
