"""`prerouter serve BUNDLE`: routing decisions over HTTP (Starlette on uvicorn: the `serve` extra), and
the `prerouter` console script.

Endpoints (JSON in and out; a bad request is a 4xx with `{"error": "..."}`):
- `POST /route`: `{"prompt": str}` or `{"messages": [...]}` (OpenAI-style; the prompt is the user
  turns joined with blank lines, `pipeline.runtime.prompt_from_messages`), optional `strong_fraction`,
  `threshold` (pair bundles) or `cost_weight` (multi) → `{"model", "scores": {model: p}, "score"}`
  (`score`: the pair score, null for multi).
- `POST /scores`: `{"prompts": [str, ...]}` (at most MAX_BATCH) and the same optional settings →
  `{"models", "results": [{"model", "scores", "score"}, ...]}`.
- `GET /healthz`, `GET /metadata` (the bundle's name, models, decision kind and the settings it takes,
  bundle_sha256, ...), `GET /metrics` (Prometheus: decisions per model, decision latency, and the
  realised strong share, or mean relative cost, of default-setting decisions beside its calibrated
  target).
- With `--upstreams FILE`: `POST /v1/chat/completions`, OpenAI-compatible. Model `router` routes the
  messages and forwards the request (streaming included) to the chosen model's upstream; a model
  name from the file is forwarded as it is. The chosen model is in the `x-prerouter-model` header.

The bundle is loaded and verified before the server starts: a bundle that fails verification stops
start-up with one line (exit 2). Metrics are per worker process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

MAX_BATCH = 1024
MAX_BODY = 8 << 20  # bytes of a request body
SETTINGS = ("strong_fraction", "threshold", "cost_weight")
ENV = "PREROUTER_SERVE"  # the options, as JSON, for worker processes (uvicorn --workers imports the factory)


def entry(argv: list[str] | None = None) -> None:
    """The `prerouter` console script: `serve` needs only the runtime and the `serve` extra; every other
    command runs the full CLI, or says in one line which extra to install when the training stack is missing."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        sys.exit(main(argv[1:]))
    try:
        from .cli import main as cli_main
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        command = argv[0] if argv else "the CLI"
        print(f"prerouter: `{command}` needs the training stack, which is not installed (no module {missing!r}); "
              "install it with: pip install 'prerouter[train]'  (a runtime-only install has `prerouter serve` "
              "with the [serve] extra, and pipeline.runtime.Router)", file=sys.stderr)
        sys.exit(2)
    cli_main()


# ---------------------------------------------------------------------------------------------
# Upstreams for the OpenAI-compatible proxy
# ---------------------------------------------------------------------------------------------


def load_upstreams(path: str | Path, models: list[str]) -> dict[str, dict]:
    """`{model: {"base_url", "model", "api_key_env"}}` from a YAML or JSON file whose top-level key
    `upstreams` maps every bundle model to its upstream: `base_url` (an OpenAI-compatible API root, e.g.
    `https://api.example.com/v1`), `model` (the upstream's model name; default the bundle's name) and
    optionally `api_key_env` (the environment variable holding the key, sent as a Bearer token)."""
    from .runtime import router_error

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise router_error(f"cannot read the upstreams file: {e}", path) from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise router_error(f"not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                     f"{' '.join(str(e).split())[:200]}", path) from None
    ups = data.get("upstreams") if isinstance(data, dict) else None
    if not isinstance(ups, dict):
        raise router_error("needs a top-level `upstreams` object: {model: {base_url, model, api_key_env}}", path)
    missing = [m for m in models if m not in ups]
    if missing:
        raise router_error(f"no upstream for the bundle's model(s) {missing}", path)
    out = {}
    for name, u in ups.items():
        if not isinstance(u, dict) or not isinstance(u.get("base_url"), str) or not u["base_url"].startswith(
                ("http://", "https://")):
            raise router_error(f"upstreams[{name!r}].base_url must be an http(s) URL", path)
        if not isinstance(u.get("model", name), str) or not isinstance(u.get("api_key_env", ""), (str, type(None))):
            raise router_error(f"upstreams[{name!r}]: model and api_key_env must be strings", path)
        out[name] = {"base_url": u["base_url"].rstrip("/"), "model": u.get("model", name),
                     "api_key_env": u.get("api_key_env")}
    return out


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _settings(body: dict) -> dict:
    out = {}
    for k in SETTINGS:
        v = body.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadRequest(f"{k} must be a finite number, got {v!r}")
            out[k] = float(v)
    return out


def create_app(bundle: str | Path | None = None, *, threads: int = 1, quantized: bool = True,
               upstreams: str | Path | None = None, router=None):
    """The Starlette app for one bundle (a factory: with no arguments it reads the options uvicorn's
    worker processes get through the PREROUTER_SERVE environment variable)."""
    import httpx
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from . import routing
    from .runtime import Router, RouterError, prompt_of

    if bundle is None and router is None:
        opts = json.loads(os.environ[ENV])
        bundle, threads, quantized, upstreams = opts["bundle"], opts["threads"], opts["quantized"], opts["upstreams"]
    router = router or Router.load(bundle, threads=threads, quantized=quantized)
    ups = load_upstreams(upstreams, router.models) if upstreams else None
    kind = router.decision["kind"]
    rel_cost = routing.model_costs(router.config["models"])
    rel_cost = routing.relative_costs(rel_cost)

    registry = CollectorRegistry()
    decisions = Counter("prerouter_decisions", "Routing decisions per chosen model", ["model"], registry=registry)
    for m in router.models:
        decisions.labels(m)
    latency = Histogram("prerouter_decision_seconds", "Time to decide one prompt (tokenize, graph, rule), "
                        "measured in the handler", registry=registry,
                        buckets=(5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0))
    requests_total = Counter("prerouter_requests", "Requests per endpoint and status", ["endpoint", "status"],
                             registry=registry)
    if kind == "pair":
        target = float(router.decision.get("default_strong_fraction", 0.5))
        realised_g = Gauge("prerouter_strong_share", "Share of default-setting decisions sent to the strong model",
                           registry=registry)
        Gauge("prerouter_strong_share_target", "The calibrated strong share of the default setting",
              registry=registry).set(target)
    else:
        lambdas = {float(k): float(v) for k, v in (router.decision.get("cost_lambdas") or {}).items()}
        target = min(lambdas, key=lambda b: abs(b - 0.5)) if lambdas and "default_cost_weight" not in router.decision \
            else float("nan")
        realised_g = Gauge("prerouter_mean_relative_cost", "Mean relative cost of default-setting decisions",
                           registry=registry)
        Gauge("prerouter_mean_relative_cost_target", "The calibrated cost budget of the default λ (NaN when "
              "default_cost_weight is set)", registry=registry).set(target)
    default_stats = {"n": 0, "sum": 0.0}

    def record(models_chosen: list[int], default: bool, seconds_each: float) -> None:
        for j in models_chosen:
            decisions.labels(router.models[j]).inc()
            latency.observe(seconds_each)
            if default:
                default_stats["n"] += 1
                default_stats["sum"] += float(j == router._strong) if kind == "pair" else float(rel_cost[j])
        if default and default_stats["n"]:
            realised_g.set(default_stats["sum"] / default_stats["n"])

    def result(p, settings: dict) -> tuple[int, dict]:
        j = int(router.choose(p, settings.get("strong_fraction"), settings.get("threshold"),
                               settings.get("cost_weight")))
        return j, {"model": router.models[j], "scores": dict(zip(router.models, map(float, p))),
                   "score": float(router.routing_score(p)) if kind == "pair" else None}

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY >> 20} MiB", 413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("the body must be JSON", 400) from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", 400)
        return body

    def endpoint(name: str):
        def wrap(fn):
            async def handler(request: Request):
                try:
                    response = await fn(request)
                except BadRequest as e:
                    response = JSONResponse({"error": str(e)}, status_code=e.status)
                except RouterError as e:
                    response = JSONResponse({"error": str(e)}, status_code=422)
                requests_total.labels(name, str(response.status_code)).inc()
                return response
            return handler
        return wrap

    @endpoint("/route")
    async def route(request: Request):
        body = await body_of(request)
        settings = _settings(body)
        prompt = prompt_of(body)
        router.check_settings(**settings)
        t = time.perf_counter()
        j, out = result(router.score_one(prompt), settings)
        record([j], not settings, time.perf_counter() - t)
        return JSONResponse(out)

    @endpoint("/scores")
    async def scores(request: Request):
        body = await body_of(request)
        settings = _settings(body)
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise BadRequest("prompts must be a non-empty list of strings")
        if len(prompts) > MAX_BATCH:
            raise BadRequest(f"at most {MAX_BATCH} prompts per request, got {len(prompts)}", 413)
        bad = next((i for i, x in enumerate(prompts) if not isinstance(x, str)), None)
        if bad is not None:
            raise BadRequest(f"prompts[{bad}] is {type(prompts[bad]).__name__}, not a string")
        router.check_settings(**settings)
        t = time.perf_counter()
        p = router.scores(prompts)
        rows = [result(row, settings) for row in p]
        record([j for j, _ in rows], not settings, (time.perf_counter() - t) / len(rows))
        return JSONResponse({"models": router.models, "results": [r for _, r in rows]})

    @endpoint("/healthz")
    async def healthz(request: Request):
        return JSONResponse({"status": "ok"})

    meta = {"name": router.config.get("name"), "models": router.models, "decision": kind,
            "settings": ["strong_fraction", "threshold"] if kind == "pair" else ["cost_weight"],
            "default": ({"strong_fraction": router.decision.get("default_strong_fraction", 0.5)} if kind == "pair"
                        else {"cost_weight": router.default_cost_weight()}),
            "costs": {m["name"]: m.get("cost") for m in router.config["models"]},
            "bundle_sha256": router.config.get("bundle_sha256"), "created_at": router.config.get("created_at"),
            "pipeline_version": router.config.get("pipeline_version"), "graph": "int8" if quantized else "fp32",
            "max_tokens": router.spec["max_tokens"], "proxy": sorted(ups) if ups else None}

    @endpoint("/metadata")
    async def metadata(request: Request):
        return JSONResponse(meta)

    async def metrics(request: Request):
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @endpoint("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        model = body.get("model")
        if model == "router":
            prompt = prompt_of({"messages": body.get("messages")})
            t = time.perf_counter()
            j = int(router.choose(router.score_one(prompt), None, None, None))
            record([j], True, time.perf_counter() - t)
            model = router.models[j]
        elif model not in ups:
            raise BadRequest(f"model must be 'router' or one of {sorted(ups)}, got {model!r}", 404)
        up = ups[model]
        headers = {"content-type": "application/json"}
        key = os.environ.get(up["api_key_env"]) if up["api_key_env"] else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        payload = json.dumps({**body, "model": up["model"]}).encode("utf-8")
        client: httpx.AsyncClient = request.app.state.client
        upstream = client.build_request("POST", f"{up['base_url']}/chat/completions", content=payload, headers=headers)
        try:
            resp = await client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            return JSONResponse({"error": f"upstream {model} ({up['base_url']}) failed: {type(e).__name__}"},
                                status_code=502, headers={"x-prerouter-model": model})
        passed = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "cache-control")}
        passed["x-prerouter-model"] = model

        async def chunks():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(chunks(), status_code=resp.status_code, headers=passed)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))
        try:
            yield
        finally:
            await app.state.client.aclose()

    routes = [Route("/route", route, methods=["POST"]), Route("/scores", scores, methods=["POST"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/metadata", metadata, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    if ups:
        routes.append(Route("/v1/chat/completions", chat, methods=["POST"]))
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    """`prerouter serve BUNDLE [--host H] [--port P] [--workers N] [--threads T] [--fp32] [--upstreams FILE]`."""
    parser = argparse.ArgumentParser(prog="prerouter serve", description="Serve a bundle's routing decisions over "
                                     "HTTP: POST /route, POST /scores, GET /healthz, /metadata, /metrics; with "
                                     "--upstreams, an OpenAI-compatible POST /v1/chat/completions proxy.")
    parser.add_argument("bundle", type=Path, help="Bundle directory.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="Worker processes (each loads the bundle).")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per worker.")
    parser.add_argument("--fp32", action="store_true", help="Serve the fp32 graph instead of int8.")
    parser.add_argument("--upstreams", type=Path, default=None,
                        help="YAML/JSON {upstreams: {model: {base_url, model, api_key_env}}} for the proxy.")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be at least 1")
    try:
        import uvicorn

        from .runtime import Router, RouterError
    except ImportError as e:
        print(f"prerouter serve: the HTTP stack is not installed (no module {getattr(e, 'name', None) or e!r}); "
              "install it with: pip install 'prerouter[serve]'", file=sys.stderr)
        return 2
    try:  # verify the bundle (and the upstreams file) before anything listens
        router = Router.load(args.bundle, threads=args.threads, quantized=not args.fp32)
        if args.upstreams:
            load_upstreams(args.upstreams, router.models)
    except RouterError as e:
        print(f"prerouter serve: error: {e}", file=sys.stderr)
        return 2
    opts = {"bundle": str(args.bundle.resolve()), "threads": args.threads, "quantized": not args.fp32,
            "upstreams": str(args.upstreams.resolve()) if args.upstreams else None}
    if args.workers == 1:
        app = create_app(router=router, upstreams=opts["upstreams"], quantized=opts["quantized"])
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    else:
        import socket

        from uvicorn.supervisors import Multiprocess

        os.environ[ENV] = json.dumps(opts)
        config = uvicorn.Config("pipeline.serve:create_app", factory=True, host=args.host, port=args.port,
                                workers=args.workers, log_level=args.log_level, access_log=False)
        # The listening socket is made here, not by uvicorn: with its protocol set to TCP, asyncio turns Nagle's
        # algorithm off on every accepted connection, as it does with one worker. uvicorn's own socket for
        # --workers leaves the protocol 0, and then a response written as headers + body waits ~40 ms for
        # the client's delayed ACK.
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as e:
            print(f"prerouter serve: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
        sock.set_inheritable(True)
        Multiprocess(config, sockets=[sock]).run()
    return 0
