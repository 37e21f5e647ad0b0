"""The torch-free runtime: the Router that serves a bundle, its one error type, and what a request's prompt is
(`prompt_of`, `prompt_from_messages`). Files of prompts and `score_file` are `pipeline.prompt_files`.

Tokenization is `pipeline.tokenization`, the rules a bundle must follow `pipeline.bundle_contract`.
Imports only numpy, onnxruntime, tokenizers and the standard library (through those modules too), so
that serving a bundle never pays for torch.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import routing
from .bundle_contract import (MAX_JSON_DEPTH, MAX_ROUTER_JSON_BYTES, bundle_digest, check_router_json,
                              check_schema_version, file_sha256, is_finite_number)
from .chat import NotText, chat_prompt
from .tokenization import RouterTokenizer, encode, encode_one, load_tokenizer


# ---------------------------------------------------------------------------------------------
# The Router: one bundle, one ONNX session, stateless per call (safe to share between threads).
# ---------------------------------------------------------------------------------------------

class RouterError(ValueError):
    """A bundle, input file or routing setting the runtime cannot use: one line naming the file (and row)
    and the reason.

    With the training stack installed, what the runtime raises is also a `pipeline.common.DataError`
    (the CLI prints it as one line, exit code 2); without it (a runtime-only install, where
    pipeline.common's rich is absent) it is this class alone. Catch `RouterError` in a service.
    """

    exit_code = 2

    def __init__(self, reason: str, *, file: str | os.PathLike | None = None, row: int | None = None):
        self.reason, self.file, self.row = reason, file, row
        where = "" if file is None else f"{file}" + (f", row {row}" if row is not None else "") + ": "
        Exception.__init__(self, where + reason)


_ERROR_CLASS: list[type] = []


def router_error(reason: str, file: str | os.PathLike | None = None, row: int | None = None) -> RouterError:
    """A RouterError that is also the pipeline's DataError when pipeline.common can be imported (looked up
    on the first error only: the serving path imports nothing of the training side)."""
    if not _ERROR_CLASS:
        try:
            from .common import DataError
        except ImportError:
            _ERROR_CLASS.append(RouterError)
        else:
            _ERROR_CLASS.append(type("RouterError", (RouterError, DataError),
                                     {"__module__": __name__, "__doc__": RouterError.__doc__}))
    return _ERROR_CLASS[0](reason, file=file, row=row)


def _bundle_error(reason: str, file: Path | None = None) -> RouterError:
    return router_error(reason, file)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "…"



def relative_costs(models: list[dict]) -> np.ndarray:
    """cost_j / max cost in index order; an unknown cost counts as index + 1, as calibration assumed."""
    return routing.relative_costs(routing.model_costs(models))


def _prompt_list(prompts) -> list[str]:
    """`prompts` as a list, or a TypeError that says what was passed instead of a list of str."""
    if isinstance(prompts, (str, bytes, bytearray, dict)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"pass a list of prompts (str), got {type(prompts).__name__}"
                        + (": wrap one prompt in a list, or call route()" if isinstance(prompts, str) else ""))
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}, not str")
    return prompts


class Router:
    """Route prompts with an exported bundle: `Router.load(path).route(prompt) -> model name`."""

    def __init__(self, session: ort.InferenceSession, tokenizer: RouterTokenizer, config: dict, path: Path):
        self.path, self.config, self.session, self.tokenizer = path, config, session, tokenizer
        self.spec = config["tokenizer"]
        self.decision = config["decision"]
        ordered = sorted(config["models"], key=lambda m: m["index"])
        self.models: list[str] = [m["name"] for m in ordered]
        self._rel_cost = relative_costs(ordered)
        kind = self.decision.get("kind")
        missing = [self.decision.get(k) for k in ("weak", "strong") if kind == "pair"
                   and self.decision.get(k) not in self.models]
        if kind not in ("pair", "multi") or missing:
            raise _bundle_error(f"router.json decision is unusable: kind {kind!r}"
                                + (f", unknown pair models {missing}" if missing else ""), path / "router.json")
        self._inputs = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs
        self._outputs = [session.get_outputs()[0].name]
        if self.decision["kind"] == "pair":
            self._weak = self.models.index(self.decision["weak"])
            self._strong = self.models.index(self.decision["strong"])
            # (strong fraction, threshold) from "never strong" to "always strong"; scores lie in [0, 1].
            self._threshold_curve = routing.threshold_curve(self.decision.get("thresholds", {}))

    @classmethod
    def load(cls, path: str | Path, threads: int = 1, quantized: bool = True, verify: bool = True) -> "Router":
        """Read and validate router.json, check the bundle digest and every file's sha256, open the (int8) graph.

        Any problem with the bundle is a RouterError (also a DataError with the training stack) naming
        the file and the reason (`verify=False` skips the hashes, not the structure checks).
        """
        path = Path(path)
        files = path.resolve()  # one version throughout, even if the bundle is rewritten meanwhile
        meta_path = path / "router.json"
        if not (files / "router.json").is_file():
            raise _bundle_error("not a bundle: router.json is missing", path)
        try:
            with open(files / "router.json", "rb") as f:
                raw = f.read(MAX_ROUTER_JSON_BYTES + 1)
            if len(raw) > MAX_ROUTER_JSON_BYTES:
                raise _bundle_error(f"router.json is larger than {MAX_ROUTER_JSON_BYTES >> 20} MiB", meta_path)
            config = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _bundle_error(f"router.json is not valid JSON: {_one_line(e)}", meta_path) from None
        except RecursionError:
            raise _bundle_error(f"router.json is invalid: nests deeper than {MAX_JSON_DEPTH} levels", meta_path) from None
        try:
            check_schema_version(config)
        except ValueError as e:
            raise _bundle_error(str(e), meta_path) from None
        try:
            check_router_json(config, files, verify)
        except ValueError as e:
            raise _bundle_error(f"router.json is invalid: {e}", meta_path) from None
        if verify:
            if bundle_digest(config) != config["bundle_sha256"]:
                raise _bundle_error("bundle_sha256 mismatch: router.json or its list of files changed after export",
                                    meta_path)
            for name, digest in config["files"].items():
                f = files / name
                if not f.is_file():
                    raise _bundle_error("listed in router.json but missing", path / name)
                if file_sha256(f) != digest:
                    raise _bundle_error("sha256 mismatch: the file changed after export", path / name)
        model_file = files / config["onnx"]["int8" if quantized else "fp32"]
        tokenizer_file = files / config["tokenizer"].get("file", "tokenizer.json")
        for f in (model_file, tokenizer_file):
            if not f.is_file():
                raise _bundle_error("missing from the bundle", path / f.name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise _bundle_error(f"not a usable ONNX graph: {_one_line(e)}", model_file) from None
        try:
            tokenizer = load_tokenizer(tokenizer_file)
        except Exception as e:
            raise _bundle_error(f"not a usable tokenizer: {_one_line(e)}", tokenizer_file) from None
        router = cls(session, tokenizer, config, path)
        router._check_graph(model_file)
        return router

    def _check_graph(self, model_file: Path) -> None:
        """The graph reads input_ids and returns one logit per model in router.json: run it on an empty prompt."""
        if "input_ids" not in self._inputs:
            raise _bundle_error(f"the graph has no input_ids input (inputs: {sorted(self._inputs)})", model_file)
        try:
            out = self._run(*encode(self.tokenizer, [""], self.spec))
        except Exception as e:
            raise _bundle_error(f"the graph does not run: {_one_line(e)}", model_file) from None
        if out.ndim != 2 or out.shape[1] != len(self.models):
            raise _bundle_error(f"router.json lists {len(self.models)} models but the graph returns "
                                f"{out.shape[1] if out.ndim == 2 else out.shape} outputs per prompt; re-export the bundle",
                                model_file)

    # -- scores ---------------------------------------------------------------------------------

    def _run(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": mask}
        return self.session.run(self._outputs, {k: v for k, v in feed.items() if k in self._inputs})[0]

    def logits(self, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """Raw logits [n, len(models)], float32; prompts are batched and padded per batch."""
        prompts = _prompt_list(prompts)
        out = [np.zeros((0, len(self.models)), dtype=np.float32)]
        for i in range(0, len(prompts), batch_size):
            out.append(self._run(*encode(self.tokenizer, prompts[i:i + batch_size], self.spec)))
        return np.concatenate(out)

    def scores(self, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """P(model j succeeds / wins) for every prompt: [n, len(models)] float64."""
        return routing.sigmoid(self.logits(prompts, batch_size))

    def score_one(self, prompt: str) -> np.ndarray:
        """P(model j succeeds / wins) for one prompt: [len(models)] float64 (batch 1, the serving path)."""
        ids = encode_one(self.tokenizer, prompt, self.spec)
        return routing.sigmoid(self._run(ids, np.ones_like(ids))[0])

    # -- decisions ------------------------------------------------------------------------------

    def threshold_for(self, strong_fraction: float) -> float:
        """Pair routing: the score threshold that sent `strong_fraction` of validation prompts to strong."""
        return routing.threshold_for(self._threshold_curve, strong_fraction)

    def routing_score(self, p: np.ndarray) -> np.ndarray:
        """Pair routing score (1 + p_strong - p_weak) / 2 in [0, 1]; higher means the strong model is needed."""
        return routing.pair_score(p, self._weak, self._strong)

    def check_settings(self, strong_fraction=None, threshold=None, cost_weight=None) -> None:
        """Raise RouterError for a setting this bundle's decision does not use or a value out of range.

        A `pair` decision takes `strong_fraction` (in [0, 1]) or `threshold` (a number), not both, and no
        `cost_weight`; a `multi` decision takes `cost_weight` (λ ≥ 0) and neither of the others. A
        setting that would be ignored is an error, so a caller never routes by a rule it did not ask for.
        """
        kind = self.decision["kind"]
        given = [k for k, v in (("strong_fraction", strong_fraction), ("threshold", threshold),
                                ("cost_weight", cost_weight)) if v is not None]
        allowed = ("strong_fraction", "threshold") if kind == "pair" else ("cost_weight",)
        wrong = [k for k in given if k not in allowed]
        if wrong:
            raise router_error(f"{' and '.join(wrong)} does not apply to this bundle: its decision is {kind!r}, which "
                         f"takes {' or '.join(allowed)}")
        if strong_fraction is not None and threshold is not None:
            raise router_error("give strong_fraction or threshold, not both")
        for name, value, lo, hi in (("strong_fraction", strong_fraction, 0.0, 1.0),
                                    ("threshold", threshold, -math.inf, math.inf),
                                    ("cost_weight", cost_weight, 0.0, math.inf)):
            if value is not None and not (is_finite_number(value) and lo <= value <= hi):
                raise router_error(f"{name} must be a finite number" + (f" in [{lo:g}, {hi:g}]" if lo > -math.inf else "")
                             + f", got {value!r}")

    def choose(self, p: np.ndarray, strong_fraction=None, threshold=None, cost_weight=None) -> np.ndarray:
        """Model index per row of probabilities p [n, len(models)] (or one index for one row), under
        the bundle's decision and these settings (checked by `check_settings`)."""
        self.check_settings(strong_fraction, threshold, cost_weight)
        if self.decision["kind"] == "pair":
            if threshold is None:
                fraction = self.decision.get("default_strong_fraction", 0.5) if strong_fraction is None else strong_fraction
                threshold = self.threshold_for(fraction)
            return np.where(self.routing_score(p) >= threshold, self._strong, self._weak)
        lam = self.default_cost_weight() if cost_weight is None else cost_weight
        return routing.choose(p, self._rel_cost, lam)

    def default_cost_weight(self) -> float:
        """N models: λ from router.json (`default_cost_weight`, else the calibrated λ nearest budget 0.5)."""
        return routing.default_cost_weight(self.decision)

    def win_probability(self, prompts: list[str], model_a: str, model_b: str) -> np.ndarray:
        """Pairwise bundles: P(model_a beats model_b) on each prompt, sigmoid(logit_a - logit_b)."""
        if "win_probability" not in self.decision:
            raise ValueError("this bundle was not trained on pairwise battles: it has no win probabilities")
        unknown = [m for m in (model_a, model_b) if m not in self.models]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; the bundle routes between {self.models}")
        logits = self.logits(prompts).astype(np.float64)
        return routing.sigmoid(logits[:, self.models.index(model_a)] - logits[:, self.models.index(model_b)])

    def route(self, prompt: str, strong_fraction: float | None = None, threshold: float | None = None,
              cost_weight: float | None = None) -> str:
        """The model name one prompt is routed to (batch 1: the latency-critical path)."""
        if not isinstance(prompt, str):
            raise TypeError(f"route takes one prompt as a str, got {type(prompt).__name__}")
        p = self.score_one(prompt)
        return self.models[int(self.choose(p, strong_fraction, threshold, cost_weight))]

    def describe(self, p: np.ndarray, choice: int) -> dict:
        """One prompt's outcome as written by `score` (and `route --scores`): `scores` ({model: probability}
        from its row `p`), `route` (the model `choice` indexes) and, for pair routers, `score`."""
        described = {"scores": dict(zip(self.models, map(float, p))), "route": self.models[int(choice)]}
        if self.decision["kind"] == "pair":
            described["score"] = float(self.routing_score(p))
        return described

    def decide(self, prompts: list[str], strong_fraction: float | None = None, threshold: float | None = None,
               cost_weight: float | None = None, batch_size: int = 64) -> list[str]:
        """`route` for many prompts at once."""
        idx = self.choose(self.scores(prompts, batch_size), strong_fraction, threshold, cost_weight)
        return [self.models[int(i)] for i in idx]


def prompt_from_messages(messages) -> str:
    """The prompt of an OpenAI-style chat by the rule ingest applies to lists of turns (`chat.chat_prompt`):
    the text of the user messages in order, joined with blank lines; system, assistant and tool messages
    are not part of it. Raises RouterError on a message it cannot read, or when no user text is left."""
    if not isinstance(messages, list) or not messages:
        raise router_error("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise router_error(f"messages[{i}] must be an object with a string role")
    try:
        prompt = chat_prompt(messages)
    except NotText as e:
        raise router_error(f"messages{e}") from None
    if not prompt:
        raise router_error("messages hold no user text to route on")
    return prompt


def prompt_of(record) -> str:
    """The prompt of a request body or a prompt-file record: exactly one of a string `prompt` or OpenAI-style
    `messages` (read by `prompt_from_messages`). RouterError otherwise."""
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        raise router_error("give exactly one of prompt (a string) or messages (OpenAI-style chat messages)")
    if "messages" in record:
        return prompt_from_messages(record["messages"])
    if not isinstance(record["prompt"], str):
        raise router_error(f"prompt must be a string, got {type(record['prompt']).__name__}")
    return record["prompt"]
