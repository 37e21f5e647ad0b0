// A prerouter bundle client for Node.js, written from docs/contracts.md §2 (onnxruntime-node + tokenizers).
//
//   import { Router } from "./router.mjs";
//   const router = await Router.load("models/NAME/bundle");       // checks every listed file's sha256
//   await router.route("Prove that ...", { strongFraction: 0.3 });  // -> model name
//
// "Characters" are Unicode code points: strings are cut with Array.from(), never with .length/.slice,
// which count UTF-16 units (an emoji is one code point but two units).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join, resolve, sep } from "node:path";

import ort from "onnxruntime-node";
import tokenizers from "tokenizers";

const { Tokenizer } = tokenizers;

function inside(root, rel) {
  const full = resolve(root, rel);
  if (!full.startsWith(resolve(root) + sep)) throw new Error(`${rel}: leaves the bundle folder`);
  return full;
}

function sha256(file) {
  return createHash("sha256").update(readFileSync(file)).digest("hex");
}

// Step 1: learned template prefixes / suffixes shortened to `keep` code points. Templates of version 2
// are matched on the prompt with \r\n and \r as \n and no ASCII whitespace at either end.
export function templateEdges(prompt) {
  return prompt.replace(/\r\n?/g, "\n").replace(/^[ \t\n\r\f\v]+|[ \t\n\r\f\v]+$/g, "");
}

export function compactTemplates(prompt, spec) {
  const templates = spec.templates;
  if (!templates) return prompt;
  if ((templates.version ?? 1) >= 2) prompt = templateEdges(prompt);
  let head = "", body = prompt, tail = "";
  for (const t of templates.prefixes || []) {
    if (body.startsWith(t.text)) {
      head = Array.from(t.text).slice(0, t.keep).join("");
      body = body.slice(t.text.length); // the matched text itself: UTF-16 lengths agree here
      break;
    }
  }
  for (const t of templates.suffixes || []) {
    if (body.endsWith(t.text)) {
      const chars = Array.from(t.text);
      body = body.slice(0, body.length - t.text.length);
      tail = chars.slice(chars.length - t.keep).join("");
      break;
    }
  }
  return head + body + tail;
}

// Step 2: at most char_window code points, head and tail joined by one inserted space.
export function clipChars(prompt, spec) {
  const chars = Array.from(prompt);
  const window = spec.char_window;
  if (chars.length <= window) return prompt;
  const tailChars = Math.floor((window * spec.tail_tokens) / (spec.head_tokens + spec.tail_tokens));
  if (tailChars === 0) return chars.slice(0, window).join("");
  return chars.slice(0, window - tailChars).join("") + " " + chars.slice(chars.length - tailChars).join("");
}

function cut(ids, spec) {
  const head = spec.head_tokens, tail = spec.tail_tokens;
  if (ids.length <= head + tail) return ids;
  return ids.slice(0, head).concat(tail ? ids.slice(ids.length - tail) : []);
}

export const sigmoid = (x) => 1 / (1 + Math.exp(-x));

// Pair rule: threshold curve from (0, 1) through the calibrated points to (1, 0), linear between points.
function thresholdCurve(thresholds) {
  const cal = Object.entries(thresholds || {}).map(([k, v]) => [Number(k), Number(v)])
    .filter(([k]) => k > 0 && k < 1).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  return [[0, 1], ...cal, [1, 0]];
}

function interpolate(points, x) {
  if (x <= points[0][0]) return points[0][1];
  for (let i = 0; i + 1 < points.length; i++) {
    const [x0, y0] = points[i], [x1, y1] = points[i + 1];
    if (x <= x1) return x1 > x0 ? y0 + ((y1 - y0) * (x - x0)) / (x1 - x0) : y1;
  }
  return points[points.length - 1][1];
}

export class Router {
  constructor(config, session, tokenizer, root) {
    this.config = config;
    this.root = root;
    this.session = session;
    this.tokenizer = tokenizer;
    this.spec = config.tokenizer;
    this.decision = config.decision;
    const ordered = [...config.models].sort((a, b) => a.index - b.index);
    this.models = ordered.map((m) => m.name);
    const costs = ordered.map((m, i) => (m.cost === null || m.cost === undefined ? i + 1 : m.cost));
    const max = Math.max(...costs);
    this.relCost = costs.map((c) => (max > 0 ? c / max : 0));
    this.byCost = this.relCost.map((c, i) => [c, i]).sort((a, b) => a[0] - b[0] || a[1] - b[1]).map(([, i]) => i);
    const id = (...names) => {
      for (const n of names) {
        const i = tokenizer.tokenToId(n);
        if (i !== null && i !== undefined) return i;
      }
      return 0;
    };
    this.cls = id("[CLS]", "<s>", "<cls>");
    this.sep = id("[SEP]", "</s>", "<sep>");
    if (this.decision.kind === "pair") {
      this.weak = this.models.indexOf(this.decision.weak);
      this.strong = this.models.indexOf(this.decision.strong);
      this.curve = thresholdCurve(this.decision.thresholds);
    }
  }

  static async load(path, { quantized = true, verify = true } = {}) {
    const config = JSON.parse(readFileSync(join(path, "router.json"), "utf8"));
    if (config.schema_version !== 2) throw new Error(`schema_version ${config.schema_version} is not supported (2)`);
    if (!["pair", "multi"].includes(config.decision?.kind)) throw new Error(`unknown decision kind`);
    const templatesVersion = config.tokenizer?.templates?.version ?? 1;
    if (![1, 2].includes(templatesVersion)) {
      throw new Error(`tokenizer.templates.version ${templatesVersion} is not supported (1, 2)`);
    }
    if (verify) {
      for (const [name, digest] of Object.entries(config.files || {})) {
        if (sha256(inside(path, name)) !== digest) throw new Error(`${name}: sha256 mismatch`);
      }
    }
    const session = await ort.InferenceSession.create(inside(path, config.onnx[quantized ? "int8" : "fp32"]), {
      intraOpNumThreads: 1, interOpNumThreads: 1, executionMode: "sequential", graphOptimizationLevel: "all",
      executionProviders: ["cpu"],
    });
    const tokenizer = Tokenizer.fromFile(inside(path, config.tokenizer.file || "tokenizer.json"));
    tokenizer.disableTruncation(); // the file may configure both; the contract cuts and pads itself
    tokenizer.disablePadding();
    return new Router(config, session, tokenizer, path);
  }

  // Steps 1-4: the text after templates and the char window, and input_ids [CLS] ... [SEP].
  async encode(prompt) {
    const text = clipChars(compactTemplates(prompt, this.spec), this.spec);
    // A lone surrogate has no UTF-8 form: U+FFFD, as the Python runtime does.
    const enc = await this.tokenizer.encode(text.toWellFormed(), null, { addSpecialTokens: false });
    return { text, ids: [this.cls, ...cut(Array.from(enc.getIds()), this.spec), this.sep] };
  }

  async scores(prompt) {
    const { ids } = await this.encode(prompt);
    const shape = [1, ids.length];
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), shape),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(ids.length).fill(1n), shape),
    };
    const use = Object.fromEntries(this.session.inputNames.filter((n) => n in feeds).map((n) => [n, feeds[n]]));
    const out = await this.session.run(use);
    return Array.from(out[this.session.outputNames[0]].data, (x) => sigmoid(x));
  }

  pairScore(p) {
    return (1 + p[this.strong] - p[this.weak]) / 2;
  }

  checkSettings({ strongFraction, threshold, costWeight } = {}) {
    const given = { strong_fraction: strongFraction, threshold, cost_weight: costWeight };
    const allowed = this.decision.kind === "pair" ? ["strong_fraction", "threshold"] : ["cost_weight"];
    const wrong = Object.keys(given).filter((k) => given[k] !== undefined && given[k] !== null && !allowed.includes(k));
    if (wrong.length) throw new Error(`${wrong.join(" and ")} does not apply to a '${this.decision.kind}' bundle`);
    if (strongFraction != null && threshold != null) throw new Error("give strong_fraction or threshold, not both");
  }

  defaultCostWeight() {
    if ("default_cost_weight" in this.decision) return Number(this.decision.default_cost_weight);
    const entries = Object.entries(this.decision.cost_lambdas || {});
    if (!entries.length) return 0;
    let best = entries[0];
    for (const e of entries) if (Math.abs(Number(e[0]) - 0.5) < Math.abs(Number(best[0]) - 0.5)) best = e;
    return Number(best[1]);
  }

  // The decision on probabilities p (model index order): docs/contracts.md, "decision".
  choose(p, settings = {}) {
    this.checkSettings(settings);
    if (this.decision.kind === "pair") {
      let t = settings.threshold;
      if (t == null) {
        const f = settings.strongFraction ?? this.decision.default_strong_fraction ?? 0.5;
        t = f <= 0 ? Infinity : f >= 1 ? -Infinity : interpolate(this.curve, f);
      }
      return this.models[this.pairScore(p) >= t ? this.strong : this.weak];
    }
    const lam = settings.costWeight ?? this.defaultCostWeight();
    let best = this.byCost[0];
    let bestU = p[best] - lam * this.relCost[best];
    for (const j of this.byCost.slice(1)) {
      const u = p[j] - lam * this.relCost[j];
      if (u > bestU) [best, bestU] = [j, u]; // a tie keeps the cheaper model
    }
    return this.models[best];
  }

  async route(prompt, settings = {}) {
    this.checkSettings(settings);
    return this.choose(await this.scores(prompt), settings);
  }
}
