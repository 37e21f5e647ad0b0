// node conformance.mjs BUNDLE: check this client against the bundle's conformance.jsonl, for both graphs.
// Prints one JSON summary line; exit 0 when every token id, score (within the file's tolerance) and
// decision matches, 1 otherwise.
import { readFileSync } from "node:fs";
import { join } from "node:path";

import { Router } from "./router.mjs";

const bundle = process.argv[2];
if (!bundle) {
  console.error("usage: node conformance.mjs BUNDLE");
  process.exit(2);
}
const config = JSON.parse(readFileSync(join(bundle, "router.json"), "utf8"));
const file = config.conformance?.file || "conformance.jsonl";
const [head, ...vectors] = readFileSync(join(bundle, file), "utf8").trim().split("\n").map((l) => JSON.parse(l));
const settings = head.settings.map((s) => ({ strongFraction: s.strong_fraction, threshold: s.threshold,
                                             costWeight: s.cost_weight }));
const summary = { prompts: vectors.length, settings: settings.length, graphs: {} };
let ok = true;
for (const graph of head.graphs) {
  const router = await Router.load(bundle, { quantized: graph === "int8" });
  const r = { text: 0, ids: 0, decisions: 0, decisionsTotal: 0, maxScoreDiff: 0, failures: [] };
  for (const v of vectors) {
    const { text, ids } = await router.encode(v.prompt);
    if (text === v.text) r.text++;
    else if (r.failures.length < 5) r.failures.push({ what: "text", prompt: v.prompt.slice(0, 60) });
    if (ids.length === v.input_ids.length && ids.every((x, i) => x === v.input_ids[i])) r.ids++;
    else if (r.failures.length < 5) r.failures.push({ what: "input_ids", prompt: v.prompt.slice(0, 60) });
    const p = await router.scores(v.prompt);
    for (let j = 0; j < p.length; j++) r.maxScoreDiff = Math.max(r.maxScoreDiff, Math.abs(p[j] - v.scores[graph][j]));
    settings.forEach((s, i) => {
      r.decisionsTotal++;
      const got = router.choose(p, s);
      if (got === v.decisions[graph][i]) r.decisions++;
      else if (r.failures.length < 5) r.failures.push({ what: "decision", setting: head.settings[i], got,
                                                          want: v.decisions[graph][i], prompt: v.prompt.slice(0, 60) });
    });
  }
  r.passed = r.text === vectors.length && r.ids === vectors.length && r.decisions === r.decisionsTotal
    && r.maxScoreDiff <= head.tolerance;
  ok &&= r.passed;
  summary.graphs[graph] = r;
}
summary.passed = ok;
console.log(JSON.stringify(summary));
process.exit(ok ? 0 : 1);
