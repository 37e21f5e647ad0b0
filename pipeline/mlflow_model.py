"""A bundle as an MLflow pyfunc model, so that MLflow's own tools load and serve it:

    mlflow.pyfunc.load_model("models:/prerouter-NAME/latest").predict(pd.DataFrame({"prompt": [...]}))
    mlflow models serve -m models:/prerouter-NAME/latest --env-manager local

`save(bundle, folder)` writes one folder that is both: the bundle's files (router.json and what it
lists) and, beside them, MLflow's `MLmodel`, the environment files and `code/`. `export` logs that
folder as the run's `bundle` artifact and registers it as the version of `prerouter-NAME`, so
`prerouter pull` and `Router.load` read the same version that MLflow loads.

The model is "from code" (MLflow loads no pickle): `router_model.py` builds a `RouterModel` on its own
folder, which is the bundle. Its code travels in `code/prerouter_runtime/` (runtime.py, tokenization.py,
bundle_contract.py, routing.py, chat.py and this file, which import each other relatively,
under a package name that cannot shadow an installed `pipeline`), and its pip requirements are the runtime's
alone: numpy, onnxruntime, tokenizers (and MLflow's own). Nothing of the training stack is imported or required.

Input: a DataFrame with a string column `prompt`, or a dict {"prompt": [...]} (`RouterModel.predict`
itself also takes a list of strings or one string). Output, one row per prompt: `model` (the model it
is routed to), for pair bundles `score` (the routing score), and `scores.<model>` (P(model succeeds or
wins on the prompt)) per model: the columns of `prerouter score`'s JSONL once flattened. Parameters:
the settings the bundle's decision kind takes, `strong_fraction` or `threshold` (pair) or
`cost_weight` (N models); left out (null), the bundle's own default.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pandas as pd
from mlflow.pyfunc import PythonModel

from .runtime import Router

PROMPT, MODEL, SCORE, SCORES = "prompt", "model", "score", "scores."
PACKAGE = "prerouter_runtime"  # the runtime as shipped in the model's code/ folder
LOADER = "router_model.py"
LOADER_CODE = f'''"""MLflow model-from-code entry point of a prerouter bundle: the bundle is this file's folder."""
from pathlib import Path

from mlflow.models import set_model

from {PACKAGE}.mlflow_model import RouterModel

set_model(RouterModel(Path(__file__).resolve().parent))
'''
SETTINGS = ("strong_fraction", "threshold", "cost_weight")  # Router.choose's order
RUNTIME_REQUIREMENTS = ("numpy", "onnxruntime", "tokenizers")
MLFLOW_FILES = ("MLmodel", "code", LOADER, "requirements.txt", "python_env.yaml", "conda.yaml",
                "input_example.json", "serving_input_example.json", "registered_model_meta")


class RouterModel(PythonModel):
    """`Router` behind MLflow's pyfunc interface (int8 graph, as served)."""

    def __init__(self, bundle: str | Path | None = None):
        self.bundle = None if bundle is None else str(bundle)
        self.router: Router | None = None

    def load_context(self, context) -> None:
        """Load and verify the bundle: the model's own folder, or an artifact `bundle` where one was logged."""
        bundle = (getattr(context, "artifacts", None) or {}).get("bundle", self.bundle)
        self.router = Router.load(bundle, verify=True)

    # The DataFrame hint is what MLflow serves (it converts requests to the signature's columns); it
    # infers no schema from it, so the signature below stays the one contract. Direct calls may pass a
    # dict, a list or a string too (`prompts_of`).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        router = self.router
        if router is None:
            raise RuntimeError("RouterModel.predict before load_context")
        prompts = prompts_of(model_input)
        params = params or {}
        p = router.scores(prompts)
        chosen = router.choose(p, *(params.get(k) for k in SETTINGS))  # a setting the kind does not take raises
        out = {MODEL: [router.models[int(i)] for i in chosen]}
        if router.decision["kind"] == "pair":
            out[SCORE] = [float(s) for s in router.routing_score(p)]
        for j, name in enumerate(router.models):
            out[SCORES + name] = p[:, j].astype("float64")
        return pd.DataFrame(out, index=range(len(prompts)))


def prompts_of(model_input) -> list[str]:
    """The prompts of a DataFrame (its `prompt` column), a dict (`prompt`: a string or a list), a
    list of strings or one string. A cell that holds a list of strings counts as those prompts (MLflow
    makes `{"prompt": [...]}` one row holding the list)."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        if PROMPT not in model_input.columns:
            raise ValueError(f"the input has no `{PROMPT}` column (columns: {list(model_input.columns)})")
        model_input = model_input[PROMPT].tolist()
    elif isinstance(model_input, dict):
        if PROMPT not in model_input:
            raise ValueError(f"the input has no `{PROMPT}` key (keys: {list(model_input)})")
        model_input = model_input[PROMPT]
    if isinstance(model_input, str):
        model_input = [model_input]
    prompts: list[str] = []
    for i, p in enumerate(model_input.tolist() if hasattr(model_input, "tolist") else model_input):
        many = p.tolist() if hasattr(p, "tolist") else p
        for q in many if isinstance(many, (list, tuple)) else [p]:
            if not isinstance(q, str):
                raise ValueError(f"prompt {len(prompts)} (row {i}) is {type(q).__name__}, not a string")
            prompts.append(q)
    return prompts


def signature(config: dict):
    """Input: a string column `prompt`; output: `model`, `score` (pair bundles), `scores.<model>`;
    parameters: the settings of the bundle's decision kind, null by default (the bundle's own)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    models = [m["name"] for m in sorted(config["models"], key=lambda m: m["index"])]
    decision = config["decision"]
    pair = decision.get("kind") == "pair"
    outputs = [ColSpec("string", MODEL)] + ([ColSpec("double", SCORE)] if pair else [])
    outputs += [ColSpec("double", SCORES + m) for m in models]
    params = [ParamSpec(k, "double", None) for k in (SETTINGS[:2] if pair else SETTINGS[2:])]
    return ModelSignature(inputs=Schema([ColSpec("string", PROMPT)]), outputs=Schema(outputs),
                          params=ParamSchema(params))


def requirements() -> list[str]:
    """The runtime's pip requirements, pinned to the versions this bundle was exported and checked with."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in RUNTIME_REQUIREMENTS]


def save(bundle: str | Path, folder: str | Path) -> Path:
    """Write `folder` (new or empty): the pyfunc model of `bundle`, with the bundle's files beside it."""
    import json
    import sys
    import tempfile

    import mlflow

    bundle, folder = Path(bundle).resolve(), Path(folder)  # one version of the bundle (see common.atomic_dir)
    config = json.loads((bundle / "router.json").read_text(encoding="utf-8"))
    clash = sorted(f.name for f in bundle.iterdir() if f.name in MLFLOW_FILES)
    if clash:
        raise ValueError(f"{bundle} holds files MLflow's model format writes: {', '.join(clash)}")
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="prerouter-pyfunc-") as stage:
        package = Path(stage) / PACKAGE
        package.mkdir()
        (package / "__init__.py").write_text(f'"""prerouter\'s runtime, as shipped with an MLflow model."""\n'
                                             f'__version__ = {config.get("pipeline_version")!r}\n')
        for name in ("runtime.py", "tokenization.py", "bundle_contract.py", "routing.py", "chat.py", "mlflow_model.py"):
            shutil.copyfile(here / name, package / name)
        loader = Path(stage) / LOADER
        loader.write_text(LOADER_CODE)
        before = set(sys.modules)
        sys.path.insert(0, stage)  # save_model runs the loader once, which imports the shipped package
        try:
            with warnings.catch_warnings():
                # MLflow advises an input example: the signature above already states the types, and an
                # example would make it run the model on the staging folder while saving.
                warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
                mlflow.pyfunc.save_model(
                    path=str(folder), python_model=str(loader), code_paths=[str(package)], signature=signature(config),
                    pip_requirements=requirements(),
                    metadata={"bundle_sha256": config.get("bundle_sha256"), "name": config.get("name"),
                              "pipeline_version": config.get("pipeline_version")})
        finally:
            sys.path.remove(stage)
            for module in [m for m in sys.modules if m.split(".")[0] == PACKAGE and m not in before]:
                del sys.modules[module]
    for f in bundle.iterdir():
        if f.is_dir():
            shutil.copytree(f, folder / f.name)
        else:
            shutil.copyfile(f, folder / f.name)
    return folder
