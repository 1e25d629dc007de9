// record-wrangler.mjs: runs the real `wrangler deploy` (4.86, from node_modules)
// against a running local-cloudflare server and prints the API requests wrangler
// made, so a Rust test can compare them with the Rust adapter's requests.
//
// env: PLAN (the JSON of a chronicle_cloudflare::WorkerPlan: the wrangler.toml
//      is written from it, so wrangler deploys the same Worker with the same
//      bindings, limits, triggers and consumer as the adapter; its secret
//      DATABASE_URL is not part of `wrangler deploy`),
//      BASE_URL (local-cloudflare base_url, .../client/v4), ACCOUNT_ID, API_TOKEN.
// stdout: ONE JSON line {"status": <wrangler exit code>, "requests": [...]}, where
//      requests are the server's /__local/requests entries made while wrangler ran
//      (the queue set-up this script does first is left out).
// stderr: wrangler's output. Exit code: wrangler's (non-zero when it failed).
//
// What it proves: which endpoints, bodies and multipart parts wrangler sends for
// this configuration, and that local-cloudflare accepts them. It does not prove
// that Cloudflare would accept them. wrangler runs with network access limited
// to loopback (loopback-only.cjs), a private config dir, metrics and error
// reports off.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

function requireEnv(name) {
  const v = process.env[name];
  if (!v) { console.error(`record-wrangler: ${name} is required`); process.exit(2); }
  return v;
}
const plan = JSON.parse(requireEnv("PLAN"));
const buildDir = path.resolve(plan.bundle);
const scriptName = plan.script;
const baseUrl = requireEnv("BASE_URL").replace(/\/$/, "");
const accountId = requireEnv("ACCOUNT_ID");
const apiToken = requireEnv("API_TOKEN");
const localUrl = baseUrl.replace(/\/client\/v4$/, "");
const wakeQueue = plan.wake_queue;
const deadLetterQueue = plan.dead_letter_queue;

if (!fs.existsSync(path.join(buildDir, plan.main_module))) { console.error(`record-wrangler: ${buildDir}/${plan.main_module} does not exist`); process.exit(2); }

function wranglerToml() {
  const vars = Object.entries(plan.vars).map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join("\n");
  const c = plan.consumer;
  return `name = ${JSON.stringify(scriptName)}
main = ${JSON.stringify(path.join(buildDir, plan.main_module))}
compatibility_date = ${JSON.stringify(plan.compatibility_date)}
account_id = ${JSON.stringify(accountId)}
workers_dev = false
preview_urls = false
no_bundle = true
send_metrics = false

[[rules]]
type = "CompiledWasm"
globs = ["**/*.wasm"]
fallthrough = false

[triggers]
crons = ${JSON.stringify(plan.crons)}

[limits]
cpu_ms = ${plan.cpu_ms}

[vars]
${vars}

[[queues.consumers]]
queue = ${JSON.stringify(wakeQueue)}
max_batch_size = ${c.batch_size}
max_batch_timeout = ${c.max_wait_time_ms / 1000}
max_retries = ${c.max_retries}
max_concurrency = ${c.max_concurrency}
retry_delay = ${c.retry_delay}
dead_letter_queue = ${JSON.stringify(deadLetterQueue)}
`;
}

async function api(method, p, body) {
  const res = await fetch(`${baseUrl}${p}`, {
    method,
    headers: { authorization: `Bearer ${apiToken}`, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await res.json();
  if (!json.success) throw new Error(`${method} ${p}: ${res.status} ${JSON.stringify(json.errors)}`);
  return json.result;
}

// wrangler deploy refuses queues that do not exist ("Queue ... does not exist"), so create them.
async function ensureQueue(name) {
  const found = await api("GET", `/accounts/${accountId}/queues?name=${encodeURIComponent(name)}`);
  if (!found.some((q) => q.queue_name === name)) await api("POST", `/accounts/${accountId}/queues`, { queue_name: name });
}

async function requestLog() {
  const res = await fetch(`${localUrl}/__local/requests`);
  if (!res.ok) throw new Error(`GET /__local/requests: ${res.status}`);
  return res.json();
}

function runWrangler(dir) {
  const env = {
    ...process.env,
    CLOUDFLARE_API_BASE_URL: baseUrl,
    CLOUDFLARE_API_TOKEN: apiToken,
    CLOUDFLARE_ACCOUNT_ID: accountId,
    WRANGLER_SEND_METRICS: "false",
    WRANGLER_SEND_ERROR_REPORTS: "false",
    WRANGLER_LOG_PATH: path.join(dir, "logs"),
    XDG_CONFIG_HOME: path.join(dir, "config"),
    NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ""} --require ${path.join(here, "loopback-only.cjs")}`.trim(),
    NO_COLOR: "1",
    FORCE_COLOR: "0",
  };
  delete env.CLOUDFLARE_API_KEY;
  delete env.CLOUDFLARE_EMAIL;
  const child = spawn(process.execPath, [path.join(here, "node_modules", "wrangler", "bin", "wrangler.js"), "deploy", "--config", path.join(dir, "wrangler.toml")], {
    cwd: dir,
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout.on("data", (c) => process.stderr.write(c)); // wrangler's stdout is ours only as stderr
  child.stderr.on("data", (c) => process.stderr.write(c));
  return new Promise((resolve) => child.on("close", (code, signal) => resolve(code ?? (signal ? 128 : 1))));
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "record-wrangler-"));
let status = 1;
let printed = false;
try {
  fs.writeFileSync(path.join(dir, "wrangler.toml"), wranglerToml());
  for (const q of [wakeQueue, deadLetterQueue]) await ensureQueue(q);
  const before = (await requestLog()).length;
  status = await runWrangler(dir);
  const requests = (await requestLog()).slice(before);
  process.stdout.write(JSON.stringify({ status, requests }) + "\n");
  printed = true;
  if (status !== 0) console.error(`record-wrangler: wrangler deploy failed with exit code ${status}`);
} catch (e) {
  console.error(`record-wrangler: ${e.stack ?? e}`);
  status = status || 1;
  // Still one JSON line on stdout, so the caller's parse error does not hide this one.
  if (!printed) process.stdout.write(JSON.stringify({ status, requests: [], error: String(e?.message ?? e) }) + "\n");
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
process.exit(status === 0 ? 0 : status || 1);
