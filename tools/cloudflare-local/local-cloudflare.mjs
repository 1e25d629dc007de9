// local-cloudflare.mjs: a local stand-in for Cloudflare, for the Rust tests.
//
// What it is
//   1. An HTTP server speaking the Cloudflare API v4 endpoints used to deploy a
//      Worker with cron triggers and a Queue consumer (the ones `wrangler deploy`
//      4.86 calls, and the ones Chronicle's Rust adapter calls). Every request
//      is checked against the documented shapes (tables below, each rule citing
//      the page it comes from) and answered in Cloudflare's envelope
//      {success, errors:[{code,message}], messages:[], result}.
//   2. A runner: each uploaded Worker really runs in Miniflare (workerd) with
//      the uploaded modules and bindings; its cron schedules are fired every
//      CRON_INTERVAL_MS; queue consumers created through the API consume in
//      Miniflare, and messages published through the API are delivered to them.
//
// What it does NOT prove
//   - That Cloudflare accepts a request: the rules are those the public docs
//     state; where the docs are silent we chose (marked "local choice") and the
//     real API may be stricter or laxer. Error codes not documented are ours.
//   - Timing, limits enforcement at the edge, cron wall-clock semantics (crons
//     fire on a timer, not on their expression), multi-region, auth scopes.
//   - Cross-Worker queues: a queue is consumed inside its consumer Worker's own
//     Miniflare instance; a producer binding in ANOTHER Worker's instance
//     reaches a separate, unconsumed local queue. API-published messages do
//     reach the consumer. max_concurrency is stored but Miniflare delivers one
//     batch at a time.
//   - Durability: messages already handed to Miniflare live in workerd's memory;
//     re-uploading the consumer Worker or changing its consumer settings restarts
//     the instance and may drop messages it had not delivered yet. Messages
//     published while no consumer runs are buffered here and never dropped.
//
// Interface
//   node local-cloudflare.mjs, env:
//     PORT (0 = a free port), STATE_DIR (uploaded modules, STATE_DIR/<script>/v<n>/),
//     API_TOKEN (when set, every API call needs "Authorization: Bearer <it>", else 403 code 10000),
//     CRON_INTERVAL_MS (default 1000: each deployed Worker's crons fire this often),
//     LOG_LEVEL (error | warn | info (default) | debug; debug echoes Worker logs to stderr).
//   stdout: exactly one JSON line {"port": n, "base_url": "http://127.0.0.1:n/client/v4"};
//   everything else goes to stderr. SIGTERM / SIGINT dispose every Miniflare and exit 0.
//   API under /client/v4 (the routes below). Test-only endpoints:
//     GET    /__local/requests             every API request so far, in order:
//            {method, path (no prefix, no query), query, content_type, json?, parts?:
//             [{name, filename, content_type, size, json?}], status}; a repeated query
//             parameter (wrangler's ?name=a&name=b) is recorded as an array.
//     DELETE /__local/requests             clears it.
//     GET    /__local/scripts/<name>       {deployed, scheduled:{fired,ok,failed},
//            queue:{batches,ok,failed}, logs (last 500 lines), bindings:[{name,type}],
//            crons, consumer|null}
//     POST   /__local/scripts/<name>/scheduled   fires each of its crons once now ("* * * * *"
//            when it has none): {outcome: "ok" or the first failing outcome}

import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import crypto from "node:crypto";
import { Miniflare, Log, LogLevel } from "miniflare";

const API_PREFIX = "/client/v4";
const PORT = Number(process.env.PORT ?? "0");
const STATE_DIR = path.resolve(process.env.STATE_DIR ?? path.join(process.cwd(), ".local-cloudflare-state"));
const API_TOKEN = process.env.API_TOKEN || null;
const CRON_INTERVAL_MS = Number(process.env.CRON_INTERVAL_MS ?? "1000");
const LOG_LEVEL = (process.env.LOG_LEVEL ?? "info").toLowerCase();
const LOG_LINES_KEPT = 500;

const debug = (...args) => { if (LOG_LEVEL === "debug") console.error("[local-cloudflare]", ...args); };
const info = (...args) => { if (LOG_LEVEL !== "error" && LOG_LEVEL !== "warn") console.error("[local-cloudflare]", ...args); };

// ---------------------------------------------------------------------------
// Errors and the envelope
// ---------------------------------------------------------------------------

// Docs: https://developers.cloudflare.com/fundamentals/api/ (every response is
// {success, errors, messages, result}); error codes cited where known.
const CODES = {
  AUTH: 10000, // "Authentication error" (Workers API, 403)
  NO_ROUTE: 7003, // "No route for the URI" (shown in the Queues API examples)
  WORKER_NOT_FOUND: 10007, // wrangler: WORKER_NOT_FOUND_ERR_CODE
  SERVICE_NOT_FOUND: 10090, // wrangler: WORKER_LEGACY_ENVIRONMENT_NOT_FOUND_ERR_CODE
  SCRIPT_INVALID: 10021, // script validation / startup error (wrangler handles 10021)
  BAD_REQUEST: 10001, // local choice: malformed request / failed validation
  QUEUE_NOT_FOUND: 10104, // https://developers.cloudflare.com/queues/reference/error-codes
  QUEUE_ID_MALFORMED: 10107, // same page
  QUEUE_EXISTS: 11009, // local choice
  CONSUMER_EXISTS: 11010, // local choice
  CONSUMER_NOT_FOUND: 11011, // local choice
  HAS_DEPENDENTS: 10064, // local choice: delete refused without ?force=true
  HYPERDRIVE_NOT_FOUND: 2000, // local choice
};

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}
const bad = (message, code = CODES.BAD_REQUEST) => new ApiError(400, code, message);
const notFound = (message, code) => new ApiError(404, code, message);

function envelope(result, { messages = [], resultInfo } = {}) {
  const body = { success: true, errors: [], messages, result };
  if (resultInfo) body.result_info = resultInfo;
  return body;
}
function errorEnvelope(err) {
  return { success: false, errors: [{ code: err.code, message: err.message }], messages: [], result: null };
}

// ---------------------------------------------------------------------------
// Validation helpers and tables
// ---------------------------------------------------------------------------

const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const isStr = (v) => typeof v === "string";
const isInt = (v) => Number.isInteger(v);

function expectObject(value, where) {
  if (!isObj(value)) throw bad(`${where} must be a JSON object`);
  return value;
}
function rejectUnknownKeys(obj, allowed, where) {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) throw bad(`${where}: unknown field '${key}' (accepted: ${allowed.join(", ")})`);
  }
}
function checkString(obj, key, where, { required = false, pattern, max } = {}) {
  const v = obj[key];
  if (v === undefined || v === null) { if (required) throw bad(`${where}: '${key}' is required`); return; }
  if (!isStr(v)) throw bad(`${where}: '${key}' must be a string`);
  if (max !== undefined && v.length > max) throw bad(`${where}: '${key}' is longer than ${max}`);
  if (pattern && !pattern.test(v)) throw bad(`${where}: '${key}' = ${JSON.stringify(v)} does not match ${pattern}`);
}
function checkIntRange(obj, key, where, min, max, { nullable = false } = {}) {
  const v = obj[key];
  if (v === undefined || (nullable && v === null)) return;
  if (!isInt(v)) throw bad(`${where}: '${key}' must be an integer`);
  if (v < min || v > max) throw bad(`${where}: '${key}' = ${v} is outside ${min}..${max}`);
}
function checkBool(obj, key, where) {
  if (obj[key] !== undefined && typeof obj[key] !== "boolean") throw bad(`${where}: '${key}' must be a boolean`);
}

// Account ids: "Identifier, maxLength 32" (every API reference page's path params).
const ACCOUNT_ID = /^[A-Za-z0-9]{1,32}$/;
// Worker names: "start with a letter, end with a letter or digit, only letters,
// digits, underscores and hyphens, at most 63 characters" (Workers scripts API
// docs, "Script naming conventions"); lower case is what the dashboard/wrangler
// produce, the docs allow letters of both cases.
const SCRIPT_NAME = /^[A-Za-z]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$/;
// Queue names: local choice where the stored docs give no rule: lower-case
// letters, digits and dashes, 1-63 characters, no leading/trailing dash.
const QUEUE_NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const QUEUE_ID = /^[0-9a-f]{32}$/; // "A Resource identifier, maxLength 32"; 10107 QueueIDMalformed
// compatibility_date: "YYYY-MM-DD" (multipart-upload-metadata page).
const DATE = /^\d{4}-\d{2}-\d{2}$/;
const BINDING_NAME = /^[A-Za-z_$][A-Za-z0-9_$]*$/; // a JavaScript identifier (env.<name>)

// Top-level metadata keys of a Worker upload.
// Docs: https://developers.cloudflare.com/workers/configuration/multipart-upload-metadata/
// and the "Upload Worker Module" API reference (PUT /accounts/{account_id}/workers/scripts/{script_name}).
// The API reference lists metadata as an object with a closed set of properties,
// so an unknown key is rejected here (local choice: the real API's reaction is not documented).
const SCRIPT_METADATA_KEYS = [
  "main_module", "body_part", "bindings", "compatibility_date", "compatibility_flags",
  "keep_bindings", "keep_assets", "assets", "logpush", "placement", "tail_consumers",
  "streaming_tail_consumers", "usage_model", "migrations", "observability", "limits",
  "annotations", "tags", "cache", "containers",
];
// Version upload (POST .../versions): "Version Upload API" attributes on the same page.
const VERSION_METADATA_KEYS = [
  "main_module", "body_part", "bindings", "compatibility_date", "compatibility_flags",
  "keep_bindings", "keep_assets", "assets", "usage_model", "annotations", "limits", "placement",
  "cache", "containers", "observability",
];

// Part content types of module uploads.
// Docs: https://developers.cloudflare.com/workers/configuration/multipart-upload-metadata/ (module types)
// and the Workers "Upload Worker Module" reference (files: content types of modules).
const MODULE_TYPES = {
  "application/javascript+module": "ESModule",
  "text/javascript+module": "ESModule",
  "application/javascript": "CommonJS",
  "text/javascript": "CommonJS",
  "application/wasm": "CompiledWasm",
  "text/plain": "Text",
  "application/octet-stream": "Data",
  "application/source-map": null, // accepted, not loaded (upload_source_maps)
  "application/json": null, // accepted as a data-less part (wrangler never sends it as a module)
};

// Bindings: type -> { required fields (name + these), optional fields, check }.
// Docs: https://developers.cloudflare.com/api/resources/workers/subresources/scripts/methods/update/
// (metadata.bindings one-of list). Types the local runner cannot provide are refused
// with a message saying so (local choice, never silently dropped).
const BINDINGS = {
  plain_text: { required: { text: "string" } },
  secret_text: { required: { text: "string" } },
  json: { required: { json: "any" } },
  queue: { required: { queue_name: "string" } },
  hyperdrive: { required: { id: "string" } },
  kv_namespace: { required: { namespace_id: "string" } },
  r2_bucket: { required: { bucket_name: "string" }, optional: { jurisdiction: "string", storage_class: "string" } },
  d1: { required: { id: "string" } },
  version_metadata: { required: {} },
  inherit: { required: {}, optional: { old_name: "string", version_id: "string" } },
};

function validateBinding(b, i) {
  const where = `metadata.bindings[${i}]`;
  expectObject(b, where);
  if (!isStr(b.type)) throw bad(`${where}: 'type' is required`);
  const spec = BINDINGS[b.type];
  if (!spec) throw bad(`${where}: binding type '${b.type}' is not supported by local-cloudflare (supported: ${Object.keys(BINDINGS).join(", ")})`);
  checkString(b, "name", where, { required: true, pattern: BINDING_NAME });
  const allowed = ["type", "name", ...Object.keys(spec.required), ...Object.keys(spec.optional ?? {})];
  rejectUnknownKeys(b, allowed, `${where} (${b.type})`);
  for (const [key, kind] of Object.entries({ ...spec.required })) {
    if (!(key in b)) throw bad(`${where} (${b.type}): '${key}' is required`);
    if (kind === "string" && !isStr(b[key])) throw bad(`${where} (${b.type}): '${key}' must be a string`);
  }
  for (const [key, kind] of Object.entries(spec.optional ?? {})) {
    if (key in b && kind === "string" && !isStr(b[key])) throw bad(`${where} (${b.type}): '${key}' must be a string`);
  }
  if (b.type === "queue" && !QUEUE_NAME.test(b.queue_name)) throw bad(`${where}: queue_name ${JSON.stringify(b.queue_name)} is not a valid queue name`);
}

function validateMetadata(meta, allowedKeys) {
  expectObject(meta, "metadata");
  rejectUnknownKeys(meta, allowedKeys, "metadata");
  // "At a minimum, the main_module key is required to upload a Worker" (module syntax);
  // body_part is the service-worker syntax, which this runner does not support.
  if (meta.body_part !== undefined) throw bad("metadata.body_part (service-worker syntax) is not supported by local-cloudflare: use main_module");
  checkString(meta, "main_module", "metadata", { required: true });
  checkString(meta, "compatibility_date", "metadata", { pattern: DATE });
  if (meta.compatibility_date && Number.isNaN(Date.parse(meta.compatibility_date))) throw bad(`metadata: compatibility_date ${meta.compatibility_date} is not a date`);
  if (meta.compatibility_flags !== undefined && !(Array.isArray(meta.compatibility_flags) && meta.compatibility_flags.every(isStr))) {
    throw bad("metadata: 'compatibility_flags' must be an array of strings");
  }
  if (meta.bindings !== undefined) {
    if (!Array.isArray(meta.bindings)) throw bad("metadata: 'bindings' must be an array");
    meta.bindings.forEach(validateBinding);
    const names = meta.bindings.map((b) => b.name);
    const dup = names.find((n, i) => names.indexOf(n) !== i);
    if (dup) throw bad(`metadata.bindings: the name '${dup}' is bound twice`);
  }
  checkBool(meta, "logpush", "metadata");
  checkBool(meta, "keep_assets", "metadata");
  if (meta.keep_bindings !== undefined && !(Array.isArray(meta.keep_bindings) && meta.keep_bindings.every(isStr))) {
    throw bad("metadata: 'keep_bindings' must be an array of binding type strings");
  }
  // usage_model: "only allowed value is standard" (multipart-upload-metadata); the API
  // reference also lists "bundled" and "unbound" (deprecated, still accepted).
  if (meta.usage_model !== undefined && !["standard", "bundled", "unbound"].includes(meta.usage_model)) {
    throw bad(`metadata: usage_model must be "standard" (got ${JSON.stringify(meta.usage_model)})`);
  }
  if (meta.limits !== undefined) {
    expectObject(meta.limits, "metadata.limits");
    rejectUnknownKeys(meta.limits, ["cpu_ms", "subrequests"], "metadata.limits");
    // cpu_ms: up to 300000 (5 minutes) on the Paid plan (Workers limits page, "CPU time").
    checkIntRange(meta.limits, "cpu_ms", "metadata.limits", 1, 300000);
    checkIntRange(meta.limits, "subrequests", "metadata.limits", 1, 10000000);
  }
  if (meta.placement !== undefined) {
    expectObject(meta.placement, "metadata.placement");
    // "mode field only supports smart" (multipart-upload-metadata); newer docs add region/hostname/host.
    if (meta.placement.mode !== undefined && !["smart", "off"].includes(meta.placement.mode)) throw bad("metadata.placement.mode must be \"smart\"");
  }
  if (meta.observability !== undefined) {
    expectObject(meta.observability, "metadata.observability");
    checkBool(meta.observability, "enabled", "metadata.observability");
    if (meta.observability.head_sampling_rate !== undefined) {
      const r = meta.observability.head_sampling_rate;
      if (typeof r !== "number" || r < 0 || r > 1) throw bad("metadata.observability.head_sampling_rate must be a number in 0..1");
    }
  }
  if (meta.tail_consumers !== undefined) {
    if (!Array.isArray(meta.tail_consumers)) throw bad("metadata: 'tail_consumers' must be an array");
    meta.tail_consumers.forEach((t, i) => { expectObject(t, `metadata.tail_consumers[${i}]`); checkString(t, "service", `metadata.tail_consumers[${i}]`, { required: true }); });
  }
  if (meta.migrations !== undefined) throw bad("metadata.migrations (Durable Objects) is not supported by local-cloudflare");
  if (meta.assets !== undefined) throw bad("metadata.assets (static assets) is not supported by local-cloudflare");
  if (meta.containers !== undefined) throw bad("metadata.containers is not supported by local-cloudflare");
}

// Cron expressions. Docs: https://developers.cloudflare.com/workers/configuration/cron-triggers/
// ("Supported cron expressions": five fields minute hour day-of-month month day-of-week;
// *, ranges, lists, steps; month JAN-DEC, weekday SUN-SAT or 1-7; L, W and # extensions).
const CRON_FIELDS = [
  { name: "minute", min: 0, max: 59 },
  { name: "hour", min: 0, max: 23 },
  { name: "day-of-month", min: 1, max: 31, extra: /^(L|LW|\d{1,2}W)$/ },
  { name: "month", min: 1, max: 12, names: ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"] },
  { name: "day-of-week", min: 0, max: 7, names: ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"], extra: /^([1-7]|SUN|MON|TUE|WED|THU|FRI|SAT)(L|#[1-5])$/i },
];

function cronValue(token, field) {
  if (/^\d+$/.test(token)) {
    const n = Number(token);
    if (n < field.min || n > field.max) throw new Error(`${field.name} value ${n} outside ${field.min}-${field.max}`);
    return n;
  }
  const idx = field.names?.indexOf(token.toUpperCase()) ?? -1;
  if (idx < 0) throw new Error(`${field.name}: '${token}' is not a number${field.names ? " or name" : ""}`);
  return idx + (field.name === "month" ? 1 : 0);
}

function validateCronField(text, field) {
  for (const part of text.split(",")) {
    if (part === "") throw new Error(`${field.name}: empty list element`);
    if (field.extra?.test(part)) continue;
    const [range, step, ...rest] = part.split("/");
    if (rest.length) throw new Error(`${field.name}: '${part}' has two steps`);
    if (step !== undefined && !(/^\d+$/.test(step) && Number(step) > 0)) throw new Error(`${field.name}: step '${step}' must be a positive integer`);
    if (range === "*" || (range === "?" && (field.name === "day-of-month" || field.name === "day-of-week"))) continue;
    const bounds = range.split("-");
    if (bounds.length > 2) throw new Error(`${field.name}: '${range}' is not a range`);
    const values = bounds.map((b) => cronValue(b, field));
    if (values.length === 2 && values[0] > values[1]) throw new Error(`${field.name}: range '${range}' is reversed`);
  }
}

function validateCron(expr) {
  if (!isStr(expr)) throw bad("schedules: 'cron' must be a string");
  const fields = expr.trim().split(/\s+/);
  if (fields.length !== 5) throw bad(`schedules: cron '${expr}' must have 5 fields (minute hour day-of-month month day-of-week), has ${fields.length}`);
  try { fields.forEach((f, i) => validateCronField(f, CRON_FIELDS[i])); } catch (e) { throw bad(`schedules: invalid cron '${expr}': ${e.message}`); }
}

// Queue consumer bodies. Docs:
//   https://developers.cloudflare.com/api/resources/queues/subresources/consumers/methods/create/
//   (Worker = {script_name, type:"worker", dead_letter_queue?, settings?{batch_size, max_concurrency,
//    max_retries, max_wait_time_ms, retry_delay}}; HTTPPull = {type:"http_pull", dead_letter_queue?,
//    settings?{batch_size, max_retries, retry_delay, visibility_timeout_ms}})
// Ranges: https://developers.cloudflare.com/queues/platform/limits/ (batch size <= 100 messages,
//   retries <= 100, batch wait time <= 60 s, 250 concurrent push consumers, delaySeconds and
//   pull visibilityTimeout <= 12 hours).
const CONSUMER_SETTINGS = {
  worker: {
    batch_size: [1, 100],
    max_concurrency: [1, 250, { nullable: true }], // "Set to null to ... the platform's maximum"
    max_retries: [0, 100],
    max_wait_time_ms: [0, 60000],
    retry_delay: [0, 43200],
  },
  http_pull: {
    batch_size: [1, 100],
    max_retries: [0, 100],
    retry_delay: [0, 43200],
    visibility_timeout_ms: [0, 43200000],
  },
};

function validateConsumerBody(body, queue) {
  expectObject(body, "consumer");
  const type = body.type;
  if (!(type in CONSUMER_SETTINGS)) throw bad(`consumer: 'type' must be "worker" or "http_pull" (got ${JSON.stringify(type)})`);
  rejectUnknownKeys(body, type === "worker" ? ["type", "script_name", "dead_letter_queue", "settings"] : ["type", "dead_letter_queue", "settings"], "consumer");
  if (type === "worker") checkString(body, "script_name", "consumer", { required: true, pattern: SCRIPT_NAME });
  if (body.dead_letter_queue !== undefined && body.dead_letter_queue !== "") {
    checkString(body, "dead_letter_queue", "consumer", { pattern: QUEUE_NAME });
    if (body.dead_letter_queue === queue.queue_name) throw bad("consumer: dead_letter_queue cannot be the queue itself");
  }
  if (body.settings !== undefined) {
    expectObject(body.settings, "consumer.settings");
    const table = CONSUMER_SETTINGS[type];
    rejectUnknownKeys(body.settings, Object.keys(table), `consumer.settings (${type})`);
    for (const [key, [min, max, opts]] of Object.entries(table)) checkIntRange(body.settings, key, "consumer.settings", min, max, opts);
  }
}

// Messages. Docs: https://developers.cloudflare.com/api/resources/queues/subresources/messages/
// (push: {body, content_type?: "text"|"json", delay_seconds?}; batch: {messages:[...], delay_seconds?});
// limits page: message <= 128 KB, sendBatch <= 100 messages / 256 KB, delay <= 12 hours.
function validateMessage(m, where) {
  expectObject(m, where);
  rejectUnknownKeys(m, ["body", "content_type", "delay_seconds"], where);
  if (!("body" in m)) throw bad(`${where}: 'body' is required`);
  const ct = m.content_type ?? "json";
  if (!["text", "json"].includes(ct)) throw bad(`${where}: content_type must be "text" or "json" (got ${JSON.stringify(m.content_type)})`);
  if (ct === "text" && !isStr(m.body)) throw bad(`${where}: a "text" message body must be a string`);
  checkIntRange(m, "delay_seconds", where, 0, 43200);
  const size = Buffer.byteLength(ct === "text" ? m.body : JSON.stringify(m.body));
  if (size > 128000) throw bad(`${where}: message of ${size} bytes exceeds 128 KB`);
  return size;
}

// Hyperdrive configs. Docs: https://developers.cloudflare.com/api/resources/hyperdrive/subresources/configs/methods/create/
// ({name, origin:{database, host, password, scheme, user, port|access_client_id...}, caching?, mtls?, origin_connection_limit?}).
function validateHyperdriveBody(body) {
  expectObject(body, "hyperdrive config");
  rejectUnknownKeys(body, ["name", "origin", "caching", "mtls", "origin_connection_limit"], "hyperdrive config");
  checkString(body, "name", "hyperdrive config", { required: true, max: 64 });
  const o = expectObject(body.origin, "hyperdrive config: 'origin'");
  rejectUnknownKeys(o, ["database", "host", "password", "scheme", "user", "port", "access_client_id", "access_client_secret"], "origin");
  for (const key of ["database", "host", "password", "user"]) checkString(o, key, "origin", { required: true });
  if (!["postgres", "postgresql", "mysql"].includes(o.scheme ?? "postgres")) throw bad("origin.scheme must be postgres, postgresql or mysql");
  if (o.access_client_id === undefined) {
    if (o.port === undefined) throw bad("origin: 'port' is required (unless connecting over Cloudflare Access)");
    checkIntRange(o, "port", "origin", 1, 65535);
  }
}

// ---------------------------------------------------------------------------
// Multipart parsing (kept by hand so part headers, filenames and content types
// are recorded exactly as sent)
// ---------------------------------------------------------------------------

function parseMultipart(buffer, contentType) {
  const m = /boundary=(?:"([^"]+)"|([^;]+))/i.exec(contentType);
  if (!m) throw bad("multipart body without a boundary");
  const boundary = Buffer.from(`--${m[1] ?? m[2]}`);
  const parts = [];
  let pos = buffer.indexOf(boundary);
  if (pos < 0) throw bad("multipart body does not contain its boundary");
  while (true) {
    pos += boundary.length;
    if (buffer.slice(pos, pos + 2).toString() === "--") break;
    pos += 2; // CRLF
    const headerEnd = buffer.indexOf("\r\n\r\n", pos);
    if (headerEnd < 0) throw bad("malformed multipart part headers");
    const headers = {};
    for (const line of buffer.slice(pos, headerEnd).toString("utf8").split("\r\n")) {
      const i = line.indexOf(":");
      if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
    }
    const next = buffer.indexOf(boundary, headerEnd + 4);
    if (next < 0) throw bad("multipart body is not terminated");
    const data = buffer.slice(headerEnd + 4, next - 2); // drop CRLF before boundary
    const disp = headers["content-disposition"] ?? "";
    const name = /\bname="([^"]*)"/.exec(disp)?.[1];
    const filename = /\bfilename="([^"]*)"/.exec(disp)?.[1] ?? null;
    if (name === undefined) throw bad("a multipart part has no name");
    parts.push({ name, filename, content_type: (headers["content-type"] ?? "").split(";")[0].trim() || null, data });
    pos = next;
  }
  return parts;
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

const now = () => new Date().toISOString();
const hexId = () => crypto.randomBytes(16).toString("hex");

const state = {
  requests: [],
  scripts: new Map(), // name -> Script
  queues: new Map(), // queue_id -> Queue
  hyperdrives: new Map(), // id -> config (with password)
  scriptSettingsDefaults: () => ({ logpush: false, observability: { enabled: false }, tail_consumers: [], tags: [] }),
};

function queueByName(name) {
  for (const q of state.queues.values()) if (q.queue_name === name) return q;
  return null;
}
function consumersOfScript(name) {
  const out = [];
  for (const q of state.queues.values()) for (const c of q.consumers) if (c.script_name === name) out.push({ queue: q, consumer: c });
  return out;
}

function newScript(name) {
  return {
    name,
    tag: hexId(),
    created_on: now(),
    modified_on: now(),
    deployed: false,
    version: null, // the deployed version {id, number, metadata, modules, dir, etag}
    versions: [],
    schedules: [],
    settings: state.scriptSettingsDefaults(),
    subdomain: { enabled: false, previews_enabled: false },
    runner: null, // {mf, optionsKey}
    cronBusy: false,
    scheduled: { fired: 0, ok: 0, failed: 0 },
    queueStats: { batches: 0, ok: 0, failed: 0 },
    logs: [],
  };
}

function pushLog(script, line) {
  script.logs.push(line);
  if (script.logs.length > LOG_LINES_KEPT) script.logs.splice(0, script.logs.length - LOG_LINES_KEPT);
  debug(`[${script.name}]`, line);
}

// ---------------------------------------------------------------------------
// Runner: Miniflare per deployed Worker
// ---------------------------------------------------------------------------

const ANSI = /\u001b\[[0-9;]*m/g;
const PUBLISH_PREFIX = "__LOCAL_CLOUDFLARE_PUBLISH_";

// Miniflare's queue broker reports each delivered batch as "QUEUE <name> <acked>/<total> (<ms>ms)".
class CapturingLog extends Log {
  constructor(script) { super(LogLevel.INFO); this.script = script; }
  logWithLevel(level, message) {
    const text = String(message).replace(ANSI, "");
    const q = /^QUEUE (\S+) (\d+)\/(\d+)/.exec(text);
    if (q) {
      const stats = this.script.queueStats;
      stats.batches += 1;
      if (q[2] === q[3]) stats.ok += 1; else stats.failed += 1;
    }
    if (level <= LogLevel.INFO) pushLog(this.script, `[miniflare] ${text}`);
    if (level <= LogLevel.WARN || LOG_LEVEL === "debug") super.logWithLevel(level, message);
  }
  log(message) { process.stderr.write(`[${this.script.name}] ${message}\n`); }
}

function captureStream(script, stream) {
  let rest = "";
  stream.on("data", (chunk) => {
    const lines = (rest + String(chunk)).split("\n");
    rest = lines.pop();
    for (const line of lines) if (line.trim() !== "") pushLog(script, line.replace(ANSI, ""));
  });
  stream.on("end", () => { if (rest.trim() !== "") pushLog(script, rest); });
}

function hyperdriveUrl(id) {
  const cfg = state.hyperdrives.get(id);
  if (!cfg) return null;
  const o = cfg.origin;
  const user = encodeURIComponent(o.user), pw = encodeURIComponent(o.password);
  return `${o.scheme ?? "postgres"}://${user}:${pw}@${o.host}:${o.port}/${encodeURIComponent(o.database)}`;
}

function miniflareOptions(script) {
  const v = script.version;
  const meta = v.metadata;
  const opts = {
    name: script.name,
    modules: v.modules.filter((m) => m.type).map((m) => ({ type: m.type, path: m.path })),
    modulesRoot: v.dir,
    compatibilityDate: meta.compatibility_date ?? "2021-11-02",
    compatibilityFlags: meta.compatibility_flags ?? [],
    bindings: {},
    queueProducers: {},
    queueConsumers: {},
    hyperdrives: {},
    kvNamespaces: {},
    r2Buckets: {},
    d1Databases: {},
    cf: false,
    host: "127.0.0.1",
  };
  for (const b of meta.bindings ?? []) {
    switch (b.type) {
      case "plain_text": case "secret_text": opts.bindings[b.name] = b.text; break;
      case "json": opts.bindings[b.name] = b.json; break;
      case "queue": opts.queueProducers[b.name] = { queueName: b.queue_name }; break;
      case "hyperdrive": opts.hyperdrives[b.name] = hyperdriveUrl(b.id); break;
      case "kv_namespace": opts.kvNamespaces[b.name] = b.namespace_id; break;
      case "r2_bucket": opts.r2Buckets[b.name] = b.bucket_name; break;
      case "d1": opts.d1Databases[b.name] = b.id; break;
      default: break; // version_metadata / inherit: nothing to provide locally
    }
  }
  consumersOfScript(script.name).forEach(({ queue, consumer }, i) => {
    const s = consumer.settings ?? {};
    opts.queueConsumers[queue.queue_name] = {
      maxBatchSize: s.batch_size ?? 10,
      maxBatchTimeout: (s.max_wait_time_ms ?? 5000) / 1000,
      maxRetries: s.max_retries ?? 3,
      ...(consumer.dead_letter_queue ? { deadLetterQueue: consumer.dead_letter_queue } : {}),
      ...(s.retry_delay !== undefined ? { retryDelay: s.retry_delay } : {}),
    };
    opts.queueProducers[`${PUBLISH_PREFIX}${i}`] = { queueName: queue.queue_name };
  });
  return opts;
}

// (Re)start the Worker's Miniflare instance when its options changed. A new
// instance is started first; the old one is disposed only when the new one is ready.
// Calls for one Worker are serialised (wrangler sends some requests in parallel).
function applyRunner(script) {
  const run = (script.applying ?? Promise.resolve()).catch(() => {}).then(() => applyRunnerNow(script));
  script.applying = run;
  return run;
}

async function applyRunnerNow(script) {
  if (!script.deployed || !script.version) return stopRunner(script);
  const opts = miniflareOptions(script);
  const key = JSON.stringify(opts);
  if (script.runner && script.runner.key === key) return;
  const mf = new Miniflare({
    ...opts,
    log: new CapturingLog(script),
    handleRuntimeStdio: (stdout, stderr) => { captureStream(script, stdout); captureStream(script, stderr); },
  });
  try {
    await mf.ready;
  } catch (e) {
    await mf.dispose().catch(() => {});
    throw e;
  }
  const old = script.runner;
  script.runner = { mf, key, opts };
  info(`${script.name}: running in Miniflare (${opts.modules.length} modules, consumers: ${Object.keys(opts.queueConsumers).join(", ") || "none"})`);
  if (old) await old.mf.dispose().catch((e) => console.error(`dispose ${script.name}:`, e));
  await flushPending();
}

async function stopRunner(script) {
  const old = script.runner;
  script.runner = null;
  if (old) await old.mf.dispose().catch((e) => console.error(`dispose ${script.name}:`, e));
}

// Queue publishing: through the hidden producer binding of the consumer's instance,
// or buffered on the queue until a consumer runs.
function publishTarget(queue) {
  const worker = queue.consumers.find((c) => c.type === "worker");
  const script = worker && state.scripts.get(worker.script_name);
  if (!script?.runner) return null;
  const i = consumersOfScript(script.name).findIndex(({ queue: q }) => q.queue_id === queue.queue_id);
  return { mf: script.runner.mf, binding: `${PUBLISH_PREFIX}${i}` };
}

async function deliver(queue, messages) {
  const target = publishTarget(queue);
  if (!target) { queue.pending.push(...messages); return; }
  const producer = await target.mf.getQueueProducer(target.binding);
  await producer.sendBatch(messages.map((m) => ({
    body: m.body,
    contentType: m.content_type ?? "json",
    ...(m.delay_seconds ? { delaySeconds: m.delay_seconds } : {}),
  })));
}

async function flushPending() {
  for (const q of state.queues.values()) {
    if (q.pending.length === 0 || !publishTarget(q)) continue;
    const batch = q.pending.splice(0, q.pending.length);
    try { await deliver(q, batch); } catch (e) { q.pending.unshift(...batch); console.error(`flush ${q.queue_name}:`, e); }
  }
}

async function fireScheduled(script) {
  if (!script.runner) return { outcome: "not-deployed" };
  const crons = script.schedules.length ? script.schedules.map((s) => s.cron) : ["* * * * *"];
  let outcome = "ok";
  for (const cron of crons) {
    script.scheduled.fired += 1;
    try {
      const worker = await script.runner.mf.getWorker();
      const result = await worker.scheduled({ cron, scheduledTime: new Date() });
      if (result.outcome === "ok") script.scheduled.ok += 1;
      else { script.scheduled.failed += 1; outcome = result.outcome; }
    } catch (e) {
      script.scheduled.failed += 1;
      outcome = "exception";
      pushLog(script, `[local-cloudflare] scheduled(${cron}) threw: ${e?.message ?? e}`);
    }
  }
  return { outcome };
}

function cronTick() {
  for (const script of state.scripts.values()) {
    if (!script.runner || script.schedules.length === 0 || script.cronBusy) continue;
    script.cronBusy = true;
    fireScheduled(script).finally(() => { script.cronBusy = false; });
  }
}

// ---------------------------------------------------------------------------
// Upload handling (PUT script and POST version share it)
// ---------------------------------------------------------------------------

function describePart(p) {
  const d = { name: p.name, filename: p.filename, content_type: p.content_type, size: p.data.length };
  if (p.content_type === "application/json" || p.name === "metadata") {
    try { d.json = JSON.parse(p.data.toString("utf8")); } catch { /* recorded without json */ }
  }
  return d;
}

function safeModulePath(dir, name) {
  const normal = path.posix.normalize(name);
  if (normal.startsWith("..") || path.isAbsolute(normal) || normal.includes("\0")) throw bad(`module part name '${name}' escapes the module root`);
  return path.join(dir, normal);
}

// Parse and validate a multipart Worker upload; returns a version (not yet deployed).
function parseUpload(ctx, scriptName, metadataKeys) {
  if (!/^multipart\/form-data/i.test(ctx.contentType ?? "")) throw bad("a Worker upload must be multipart/form-data with a 'metadata' part");
  const parts = ctx.parts;
  const metaPart = parts.find((p) => p.name === "metadata");
  if (!metaPart) throw bad("multipart upload has no 'metadata' part");
  let meta;
  try { meta = JSON.parse(metaPart.data.toString("utf8")); } catch (e) { throw bad(`metadata part is not JSON: ${e.message}`); }
  validateMetadata(meta, metadataKeys);
  const moduleParts = parts.filter((p) => p !== metaPart);
  const names = new Set();
  for (const p of moduleParts) {
    if (names.has(p.name)) throw bad(`part '${p.name}' is uploaded twice`);
    names.add(p.name);
    if (!p.content_type || !(p.content_type in MODULE_TYPES)) {
      throw bad(`part '${p.name}' has content type ${JSON.stringify(p.content_type)}; accepted: ${Object.keys(MODULE_TYPES).join(", ")}`);
    }
  }
  const main = moduleParts.find((p) => p.name === meta.main_module);
  if (!main) throw bad(`main_module '${meta.main_module}' names no uploaded part (parts: ${[...names].join(", ") || "none"})`, CODES.SCRIPT_INVALID);
  if (!["ESModule", "CommonJS"].includes(MODULE_TYPES[main.content_type])) throw bad(`main_module '${meta.main_module}' must be a JavaScript module, is ${main.content_type}`, CODES.SCRIPT_INVALID);
  for (const b of meta.bindings ?? []) {
    if (b.type === "hyperdrive" && !state.hyperdrives.has(b.id)) throw bad(`binding '${b.name}': Hyperdrive config '${b.id}' does not exist`, CODES.HYPERDRIVE_NOT_FOUND);
  }
  const script = state.scripts.get(scriptName);
  const number = (script?.versions.length ?? 0) + 1;
  const dir = path.join(STATE_DIR, scriptName, `v${number}`);
  const modules = moduleParts.map((p) => ({ name: p.name, content_type: p.content_type, type: MODULE_TYPES[p.content_type], path: safeModulePath(dir, p.name), data: p.data }));
  // keep_bindings: carry over the previous version's bindings of those types (docs: "List of binding types to keep from previous_upload").
  const prev = script?.version?.metadata?.bindings ?? [];
  if (meta.keep_bindings?.length) {
    const present = new Set((meta.bindings ?? []).map((b) => b.name));
    meta.bindings = [...(meta.bindings ?? []), ...prev.filter((b) => meta.keep_bindings.includes(b.type) && !present.has(b.name))];
  }
  // inherit bindings: with bindings_inherit=strict the upload fails when one cannot be resolved.
  if (meta.bindings?.some((b) => b.type === "inherit")) {
    meta.bindings = meta.bindings.map((b) => {
      if (b.type !== "inherit") return b;
      const old = prev.find((p) => p.name === (b.old_name ?? b.name));
      if (!old) {
        if (ctx.query.bindings_inherit === "strict") throw bad(`binding '${b.name}' inherits from a previous version that has no such binding`);
        return null;
      }
      return { ...old, name: b.name };
    }).filter(Boolean);
  }
  const etag = crypto.createHash("sha256").update(Buffer.concat(moduleParts.map((p) => p.data))).digest("hex");
  return { id: crypto.randomUUID(), number, metadata: meta, modules, dir, etag, created_on: now() };
}

function writeModules(version) {
  fs.rmSync(version.dir, { recursive: true, force: true });
  for (const m of version.modules) {
    fs.mkdirSync(path.dirname(m.path), { recursive: true });
    fs.writeFileSync(m.path, m.data);
  }
}

// Deploy a version: write its modules and (re)start Miniflare. A Worker that
// fails to start is refused like Cloudflare refuses it (10021), the previous
// version stays deployed.
async function deployVersion(script, version) {
  writeModules(version);
  const previous = { version: script.version, deployed: script.deployed };
  const logsBefore = script.logs.length;
  script.version = version;
  script.deployed = true;
  try {
    await applyRunner(script);
  } catch (e) {
    script.version = previous.version;
    script.deployed = previous.deployed;
    const runtime = script.logs.slice(logsBefore).filter((l) => !l.startsWith("[miniflare]")).slice(-8).join("\n");
    throw bad(`Uncaught error while starting the Worker: ${String(e?.message ?? e).split("\n")[0]}${runtime ? `\n${runtime}` : ""}`, CODES.SCRIPT_INVALID);
  }
  script.modified_on = now();
}

// Cloudflare reports where a Worker was last deployed from ("wrangler", "api", "dash");
// locally: wrangler when its User-Agent says so (wrangler warns before overwriting an "api" one).
function uploader(ctx) {
  return /wrangler/i.test(ctx.userAgent ?? "") ? "wrangler" : "api";
}

function handlersOf(version) {
  const src = version.modules.filter((m) => m.type === "ESModule").map((m) => m.data.toString("utf8")).join("\n");
  return ["fetch", "scheduled", "queue", "tail", "email"].filter((h) => new RegExp(`\\b${h}\\b`).test(src));
}

function scriptResult(script) {
  const v = script.version;
  return {
    id: script.name,
    tag: script.tag,
    etag: v?.etag,
    handlers: v ? handlersOf(v) : [],
    named_handlers: [],
    created_on: script.created_on,
    modified_on: script.modified_on,
    usage_model: v?.metadata.usage_model ?? "standard",
    compatibility_date: v?.metadata.compatibility_date,
    compatibility_flags: v?.metadata.compatibility_flags ?? [],
    has_assets: false,
    has_modules: true,
    logpush: script.settings.logpush,
    placement_mode: v?.metadata.placement?.mode,
    tail_consumers: script.settings.tail_consumers,
    observability: script.settings.observability,
    deployment_id: v?.id,
    startup_time_ms: 1,
    last_deployed_from: script.deployedFrom ?? "api",
  };
}

function versionResult(script, v) {
  return {
    id: v.id,
    number: v.number,
    metadata: { author_email: "local@example.com", author_id: "local", created_on: v.created_on, modified_on: v.created_on, source: "api", hasPreview: false },
    annotations: v.metadata.annotations ?? {},
    resources: {
      bindings: publicBindings(v.metadata.bindings ?? []),
      script: { etag: v.etag, handlers: handlersOf(v), last_deployed_from: "api" },
      script_runtime: { compatibility_date: v.metadata.compatibility_date, compatibility_flags: v.metadata.compatibility_flags ?? [], usage_model: v.metadata.usage_model ?? "standard", limits: v.metadata.limits ?? {} },
    },
    startup_time_ms: 1,
  };
}

// Bindings as reported: secret values are never returned (the API hides them too).
function publicBindings(bindings) {
  return bindings.map((b) => (b.type === "secret_text" ? { type: b.type, name: b.name } : b));
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

const routes = [];
function route(method, pattern, handler) {
  const keys = [];
  const re = new RegExp("^" + pattern.replace(/\{(\w+)\}/g, (_, k) => { keys.push(k); return "([^/]+)"; }) + "$");
  routes.push({ method, re, keys, handler });
}

function requireAccount(p) {
  if (!ACCOUNT_ID.test(p.account_id)) throw bad(`account_id '${p.account_id}' is not an identifier (1-32 alphanumeric characters)`);
}
function requireScriptName(name) {
  if (!SCRIPT_NAME.test(name)) throw bad(`script name '${name}' is invalid: start with a letter, end with a letter or digit, only letters, digits, '_' and '-', at most 63 characters`);
}
function existingScript(p) {
  requireAccount(p);
  const script = state.scripts.get(p.script_name);
  if (!script || !script.deployed && script.versions.length === 0) throw notFound("This Worker does not exist on your account.", CODES.WORKER_NOT_FOUND);
  return script;
}
function existingQueue(p) {
  requireAccount(p);
  if (!QUEUE_ID.test(p.queue_id)) throw bad(`queue id '${p.queue_id}' is malformed`, CODES.QUEUE_ID_MALFORMED);
  const q = state.queues.get(p.queue_id);
  if (!q) throw notFound(`Queue ${p.queue_id} does not exist`, CODES.QUEUE_NOT_FOUND);
  return q;
}
// The body must be JSON. The Content-Type is not checked: wrangler 4.86 sends some
// JSON bodies (queue consumers, queue creation) as text/plain, and Cloudflare accepts them.
function jsonBody(ctx, where) {
  if (ctx.json === undefined && !ctx.jsonError) throw bad(`${where}: a JSON body is required`);
  if (ctx.jsonError) throw bad(`${where}: body is not valid JSON: ${ctx.jsonError}`);
  return ctx.json;
}

// --- Workers scripts -------------------------------------------------------

// GET /accounts/{a}/workers/services/{name}: wrangler's existence probe (404 code 10090 when absent).
route("GET", "/accounts/{account_id}/workers/services/{script_name}", (ctx, p) => {
  requireAccount(p);
  const script = state.scripts.get(p.script_name);
  if (!script?.deployed) throw notFound("This Worker does not exist on your account.", CODES.SERVICE_NOT_FOUND);
  return {
    id: script.name,
    default_environment: { environment: "production", created_on: script.created_on, modified_on: script.modified_on, script: scriptResult(script) },
    created_on: script.created_on,
    modified_on: script.modified_on,
    environments: [{ environment: "production", created_on: script.created_on, modified_on: script.modified_on }],
  };
});

route("GET", "/accounts/{account_id}/workers/scripts", (ctx, p) => {
  requireAccount(p);
  return [...state.scripts.values()].filter((s) => s.deployed).map(scriptResult);
});

// PUT /accounts/{a}/workers/scripts/{name}: upload and deploy a module Worker.
// Docs: "Upload Worker Module"; query bindings_inherit ("strict") and excludeScript are accepted.
route("PUT", "/accounts/{account_id}/workers/scripts/{script_name}", async (ctx, p) => {
  requireAccount(p);
  requireScriptName(p.script_name);
  rejectUnknownKeys(ctx.query, ["bindings_inherit", "excludeScript"], "query");
  if (ctx.query.bindings_inherit !== undefined && ctx.query.bindings_inherit !== "strict") throw bad("bindings_inherit must be \"strict\"");
  const version = parseUpload(ctx, p.script_name, SCRIPT_METADATA_KEYS);
  const script = state.scripts.get(p.script_name) ?? newScript(p.script_name);
  await deployVersion(script, version);
  script.deployedFrom = uploader(ctx);
  state.scripts.set(script.name, script);
  script.versions.push(version);
  const m = version.metadata;
  if (m.logpush !== undefined) script.settings.logpush = m.logpush;
  if (m.observability !== undefined) script.settings.observability = m.observability;
  if (m.tail_consumers !== undefined) script.settings.tail_consumers = m.tail_consumers;
  return scriptResult(script);
});

// DELETE /accounts/{a}/workers/scripts/{name}?force=true
// Docs ("Delete Worker"): "force: If set to true, delete will not be stopped by associated
// service binding, durable object, or other binding. Any of these associated bindings/durable
// objects will be deleted along with the script." A queue consumer is such a dependent.
route("DELETE", "/accounts/{account_id}/workers/scripts/{script_name}", async (ctx, p) => {
  const script = existingScript(p);
  rejectUnknownKeys(ctx.query, ["force"], "query");
  const force = ctx.query.force === "true";
  const consumers = consumersOfScript(script.name);
  if (consumers.length && !force) {
    throw bad(`Worker '${script.name}' is the consumer of queue(s) ${consumers.map((c) => c.queue.queue_name).join(", ")}; delete the consumer(s) first or pass ?force=true`, CODES.HAS_DEPENDENTS);
  }
  for (const { queue, consumer } of consumers) queue.consumers = queue.consumers.filter((c) => c !== consumer);
  state.scripts.delete(script.name);
  script.deployed = false;
  await applyRunner(script); // stops its instance (serialised with any restart under way)
  fs.rmSync(path.join(STATE_DIR, script.name), { recursive: true, force: true });
  return null;
});

// Cron triggers. Docs: "Update Cron Triggers" / "Get Cron Triggers"
// (PUT body: [{cron}], result {schedules:[{cron, created_on, modified_on}]}).
route("GET", "/accounts/{account_id}/workers/scripts/{script_name}/schedules", (ctx, p) => ({ schedules: existingScript(p).schedules }));
route("PUT", "/accounts/{account_id}/workers/scripts/{script_name}/schedules", (ctx, p) => {
  const script = existingScript(p);
  const body = jsonBody(ctx, "schedules");
  if (!Array.isArray(body)) throw bad("schedules: body must be an array of {\"cron\": \"...\"}");
  body.forEach((s, i) => { expectObject(s, `schedules[${i}]`); rejectUnknownKeys(s, ["cron"], `schedules[${i}]`); validateCron(s.cron); });
  const t = now();
  script.schedules = body.map((s) => ({ cron: s.cron.trim(), created_on: t, modified_on: t }));
  return { schedules: script.schedules };
});

// Script settings (non-versioned): PATCH/GET .../script-settings (JSON) and GET .../settings.
// Docs: "Patch Script Settings" {logpush, observability, tail_consumers, tags}.
const SCRIPT_SETTINGS_KEYS = ["logpush", "observability", "tail_consumers", "tags"];
route("GET", "/accounts/{account_id}/workers/scripts/{script_name}/script-settings", (ctx, p) => existingScript(p).settings);
route("PATCH", "/accounts/{account_id}/workers/scripts/{script_name}/script-settings", (ctx, p) => {
  const script = existingScript(p);
  const body = expectObject(jsonBody(ctx, "script-settings"), "script-settings");
  rejectUnknownKeys(body, SCRIPT_SETTINGS_KEYS, "script-settings");
  checkBool(body, "logpush", "script-settings");
  if (body.observability !== undefined && body.observability !== null) expectObject(body.observability, "script-settings.observability");
  if (body.tail_consumers !== undefined && body.tail_consumers !== null && !Array.isArray(body.tail_consumers)) throw bad("script-settings.tail_consumers must be an array");
  if (body.tags !== undefined && body.tags !== null && !(Array.isArray(body.tags) && body.tags.every(isStr))) throw bad("script-settings.tags must be an array of strings");
  for (const k of SCRIPT_SETTINGS_KEYS) if (body[k] !== undefined) script.settings[k] = body[k] ?? state.scriptSettingsDefaults()[k];
  return script.settings;
});
route("GET", "/accounts/{account_id}/workers/scripts/{script_name}/settings", (ctx, p) => {
  const script = existingScript(p);
  const m = script.version?.metadata ?? {};
  return {
    ...script.settings,
    bindings: publicBindings(m.bindings ?? []),
    compatibility_date: m.compatibility_date,
    compatibility_flags: m.compatibility_flags ?? [],
    limits: m.limits ?? {},
    placement: m.placement ?? {},
    usage_model: m.usage_model ?? "standard",
  };
});

// Versions and deployments (wrangler's path for an existing Worker).
// Docs: "Upload Version" (POST .../versions, multipart like the script upload) and
// "Create Deployment" (POST .../deployments {strategy:"percentage", versions:[{version_id, percentage}]}).
route("POST", "/accounts/{account_id}/workers/scripts/{script_name}/versions", (ctx, p) => {
  const script = existingScript(p);
  rejectUnknownKeys(ctx.query, ["bindings_inherit"], "query");
  const version = parseUpload(ctx, script.name, VERSION_METADATA_KEYS);
  script.versions.push(version);
  return versionResult(script, version);
});
route("GET", "/accounts/{account_id}/workers/scripts/{script_name}/versions", (ctx, p) => {
  const script = existingScript(p);
  return { items: script.versions.map((v) => versionResult(script, v)).reverse() };
});
route("POST", "/accounts/{account_id}/workers/scripts/{script_name}/deployments", async (ctx, p) => {
  const script = existingScript(p);
  rejectUnknownKeys(ctx.query, ["force"], "query");
  const body = expectObject(jsonBody(ctx, "deployment"), "deployment");
  rejectUnknownKeys(body, ["strategy", "versions", "annotations"], "deployment");
  if (body.strategy !== "percentage") throw bad("deployment.strategy must be \"percentage\"");
  if (!Array.isArray(body.versions) || body.versions.length === 0 || body.versions.length > 2) throw bad("deployment.versions must list 1 or 2 versions");
  let total = 0;
  for (const [i, v] of body.versions.entries()) {
    expectObject(v, `deployment.versions[${i}]`);
    checkString(v, "version_id", `deployment.versions[${i}]`, { required: true });
    if (typeof v.percentage !== "number" || v.percentage < 0 || v.percentage > 100) throw bad(`deployment.versions[${i}].percentage must be 0..100`);
    if (!script.versions.some((x) => x.id === v.version_id)) throw notFound(`version ${v.version_id} does not exist`, CODES.BAD_REQUEST);
    total += v.percentage;
  }
  if (Math.abs(total - 100) > 1e-9) throw bad("deployment.versions percentages must add up to 100");
  // Locally the version with the largest share runs (no traffic split).
  const chosen = [...body.versions].sort((a, b) => b.percentage - a.percentage)[0];
  await deployVersion(script, script.versions.find((x) => x.id === chosen.version_id));
  script.deployedFrom = uploader(ctx);
  script.lastDeployment = { id: crypto.randomUUID(), source: "api", strategy: "percentage", versions: body.versions, created_on: now(), annotations: body.annotations ?? {} };
  return script.lastDeployment;
});
route("GET", "/accounts/{account_id}/workers/scripts/{script_name}/deployments", (ctx, p) => {
  const script = existingScript(p);
  return { deployments: script.lastDeployment ? [script.lastDeployment] : [] };
});

// workers.dev: account subdomain and per-script toggle.
// Docs: "Get Subdomain" (account) {subdomain}; "Post Worker Subdomain" {enabled, previews_enabled}.
route("GET", "/accounts/{account_id}/workers/subdomain", (ctx, p) => { requireAccount(p); return { subdomain: "local-cloudflare" }; });
route("GET", "/accounts/{account_id}/workers/scripts/{script_name}/subdomain", (ctx, p) => existingScript(p).subdomain);
route("POST", "/accounts/{account_id}/workers/scripts/{script_name}/subdomain", (ctx, p) => {
  const script = existingScript(p);
  const body = expectObject(jsonBody(ctx, "subdomain"), "subdomain");
  rejectUnknownKeys(body, ["enabled", "previews_enabled"], "subdomain");
  if (typeof body.enabled !== "boolean") throw bad("subdomain: 'enabled' (boolean) is required");
  checkBool(body, "previews_enabled", "subdomain");
  script.subdomain = { enabled: body.enabled, previews_enabled: body.previews_enabled ?? body.enabled };
  return script.subdomain;
});

// --- Queues ------------------------------------------------------------------

function queueResult(q) {
  const producers = [];
  for (const s of state.scripts.values()) {
    if ((s.version?.metadata.bindings ?? []).some((b) => b.type === "queue" && b.queue_name === q.queue_name)) producers.push({ type: "worker", script: s.name });
  }
  return {
    queue_id: q.queue_id,
    queue_name: q.queue_name,
    created_on: q.created_on,
    modified_on: q.modified_on,
    settings: q.settings,
    producers,
    producers_total_count: producers.length,
    consumers: q.consumers.map(consumerResult),
    consumers_total_count: q.consumers.length,
  };
}
// The API reference names the Worker "script_name"; wrangler 4.86 matches on "script"/"service"
// in the queue listing, so both are returned.
function consumerResult(c) {
  return { ...c, script: c.script_name, service: c.script_name, environment: "production" };
}

// Docs: "List Queues" (GET /accounts/{a}/queues, paginated; wrangler adds ?page= and repeated ?name=).
route("GET", "/accounts/{account_id}/queues", (ctx, p) => {
  requireAccount(p);
  const names = ctx.searchParams.getAll("name");
  const all = [...state.queues.values()].filter((q) => names.length === 0 || names.includes(q.queue_name));
  const page = Number(ctx.query.page ?? "1");
  const perPage = Number(ctx.query.per_page ?? "100");
  if (!isInt(page) || page < 1 || !isInt(perPage) || perPage < 1 || perPage > 1000) throw bad("page/per_page must be positive integers");
  const slice = all.slice((page - 1) * perPage, page * perPage);
  return { __list: slice.map(queueResult), resultInfo: { page, per_page: perPage, count: slice.length, total_count: all.length, total_pages: Math.ceil(all.length / perPage) } };
});

// Docs: "Create Queue" {queue_name}; settings {delivery_delay, delivery_paused, message_retention_period}.
function validateQueueSettings(s) {
  if (s === undefined) return;
  expectObject(s, "queue.settings");
  rejectUnknownKeys(s, ["delivery_delay", "delivery_paused", "message_retention_period"], "queue.settings");
  checkIntRange(s, "delivery_delay", "queue.settings", 0, 43200);
  checkBool(s, "delivery_paused", "queue.settings");
  checkIntRange(s, "message_retention_period", "queue.settings", 60, 1209600); // 60 s .. 14 days (limits page)
}
route("POST", "/accounts/{account_id}/queues", (ctx, p) => {
  requireAccount(p);
  const body = expectObject(jsonBody(ctx, "queue"), "queue");
  rejectUnknownKeys(body, ["queue_name", "settings"], "queue");
  checkString(body, "queue_name", "queue", { required: true, pattern: QUEUE_NAME });
  validateQueueSettings(body.settings);
  if (queueByName(body.queue_name)) throw bad(`A queue named '${body.queue_name}' already exists`, CODES.QUEUE_EXISTS);
  const q = {
    queue_id: hexId(), queue_name: body.queue_name, created_on: now(), modified_on: now(),
    settings: { delivery_delay: 0, delivery_paused: false, message_retention_period: 345600, ...(body.settings ?? {}) },
    consumers: [], pending: [],
  };
  state.queues.set(q.queue_id, q);
  return queueResult(q);
});
route("GET", "/accounts/{account_id}/queues/{queue_id}", (ctx, p) => queueResult(existingQueue(p)));
route("DELETE", "/accounts/{account_id}/queues/{queue_id}", async (ctx, p) => {
  const q = existingQueue(p);
  const scripts = q.consumers.map((c) => state.scripts.get(c.script_name)).filter(Boolean);
  state.queues.delete(q.queue_id);
  for (const s of scripts) await applyRunner(s);
  return null;
});

// Consumers. Docs: "Create a Queue Consumer", "Update Queue Consumer" ("Updates the consumer for a
// queue, or creates one if it does not exist"), "Delete Queue Consumer", "List Queue Consumers".
// Queues docs: a queue has at most one (push) Worker consumer.
function storeConsumer(q, body, consumerId) {
  const old = q.consumers.find((c) => c.consumer_id === consumerId);
  const consumer = {
    consumer_id: consumerId ?? hexId(),
    created_on: old?.created_on ?? now(),
    type: body.type,
    queue_name: q.queue_name,
    ...(body.type === "worker" ? { script_name: body.script_name } : {}),
    dead_letter_queue: body.dead_letter_queue ?? "",
    settings: { ...(body.settings ?? {}) },
  };
  q.consumers = q.consumers.filter((c) => c !== old).concat(consumer);
  q.modified_on = now();
  return { consumer, oldScript: old?.script_name };
}
async function applyConsumerChange(names) {
  for (const name of new Set(names.filter(Boolean))) {
    const s = state.scripts.get(name);
    if (s) await applyRunner(s);
  }
}
function checkConsumerTarget(q, body, replacing) {
  if (body.type === "worker") {
    if (!state.scripts.get(body.script_name)?.deployed) throw notFound(`Worker '${body.script_name}' does not exist on your account`, CODES.WORKER_NOT_FOUND);
  }
  const others = q.consumers.filter((c) => c.consumer_id !== replacing);
  if (others.length > 0) throw bad(`Queue '${q.queue_name}' already has a consumer (${others[0].consumer_id}); a queue has only one consumer`, CODES.CONSUMER_EXISTS);
}
route("GET", "/accounts/{account_id}/queues/{queue_id}/consumers", (ctx, p) => existingQueue(p).consumers.map(consumerResult));
route("POST", "/accounts/{account_id}/queues/{queue_id}/consumers", async (ctx, p) => {
  const q = existingQueue(p);
  const body = jsonBody(ctx, "consumer");
  validateConsumerBody(body, q);
  checkConsumerTarget(q, body, null);
  const { consumer } = storeConsumer(q, body, null);
  await applyConsumerChange([consumer.script_name]);
  return consumerResult(consumer);
});
route("GET", "/accounts/{account_id}/queues/{queue_id}/consumers/{consumer_id}", (ctx, p) => {
  const q = existingQueue(p);
  const c = q.consumers.find((x) => x.consumer_id === p.consumer_id);
  if (!c) throw notFound(`Consumer ${p.consumer_id} does not exist`, CODES.CONSUMER_NOT_FOUND);
  return consumerResult(c);
});
route("PUT", "/accounts/{account_id}/queues/{queue_id}/consumers/{consumer_id}", async (ctx, p) => {
  const q = existingQueue(p);
  if (!QUEUE_ID.test(p.consumer_id)) throw bad(`consumer id '${p.consumer_id}' is malformed`);
  const body = jsonBody(ctx, "consumer");
  validateConsumerBody(body, q);
  checkConsumerTarget(q, body, p.consumer_id);
  const { consumer, oldScript } = storeConsumer(q, body, p.consumer_id);
  await applyConsumerChange([oldScript, consumer.script_name]);
  return consumerResult(consumer);
});
route("DELETE", "/accounts/{account_id}/queues/{queue_id}/consumers/{consumer_id}", async (ctx, p) => {
  const q = existingQueue(p);
  const c = q.consumers.find((x) => x.consumer_id === p.consumer_id);
  if (!c) throw notFound(`Consumer ${p.consumer_id} does not exist`, CODES.CONSUMER_NOT_FOUND);
  q.consumers = q.consumers.filter((x) => x !== c);
  await applyConsumerChange([c.script_name]);
  return null;
});

// Messages. Docs: "Push Message" / "Push Message Batch".
route("POST", "/accounts/{account_id}/queues/{queue_id}/messages", async (ctx, p) => {
  const q = existingQueue(p);
  const body = jsonBody(ctx, "message");
  validateMessage(body, "message");
  await deliver(q, [body]);
  return null;
});
route("POST", "/accounts/{account_id}/queues/{queue_id}/messages/batch", async (ctx, p) => {
  const q = existingQueue(p);
  const body = expectObject(jsonBody(ctx, "batch"), "batch");
  rejectUnknownKeys(body, ["messages", "delay_seconds"], "batch");
  checkIntRange(body, "delay_seconds", "batch", 0, 43200);
  if (!Array.isArray(body.messages) || body.messages.length === 0) throw bad("batch: 'messages' must be a non-empty array");
  if (body.messages.length > 100) throw bad(`batch: ${body.messages.length} messages exceed the limit of 100`);
  const total = body.messages.reduce((sum, m, i) => sum + validateMessage(m, `batch.messages[${i}]`), 0);
  if (total > 256000) throw bad(`batch: ${total} bytes exceed 256 KB`);
  await deliver(q, body.messages.map((m) => ({ ...m, delay_seconds: m.delay_seconds ?? body.delay_seconds })));
  return null;
});

// --- Hyperdrive --------------------------------------------------------------

function hyperdriveResult(cfg) {
  const { password, ...origin } = cfg.origin; // the API never returns the password
  return { ...cfg, origin };
}
route("POST", "/accounts/{account_id}/hyperdrive/configs", (ctx, p) => {
  requireAccount(p);
  const body = jsonBody(ctx, "hyperdrive config");
  validateHyperdriveBody(body);
  const cfg = { id: hexId(), name: body.name, origin: { scheme: "postgres", ...body.origin }, caching: body.caching ?? { disabled: false }, created_on: now(), modified_on: now() };
  state.hyperdrives.set(cfg.id, cfg);
  return hyperdriveResult(cfg);
});
route("GET", "/accounts/{account_id}/hyperdrive/configs", (ctx, p) => { requireAccount(p); return [...state.hyperdrives.values()].map(hyperdriveResult); });
function existingHyperdrive(p) {
  requireAccount(p);
  const cfg = state.hyperdrives.get(p.hyperdrive_id);
  if (!cfg) throw notFound(`Hyperdrive config ${p.hyperdrive_id} does not exist`, CODES.HYPERDRIVE_NOT_FOUND);
  return cfg;
}
route("GET", "/accounts/{account_id}/hyperdrive/configs/{hyperdrive_id}", (ctx, p) => hyperdriveResult(existingHyperdrive(p)));
route("DELETE", "/accounts/{account_id}/hyperdrive/configs/{hyperdrive_id}", (ctx, p) => {
  const cfg = existingHyperdrive(p);
  // Local choice: a config still bound by a deployed Worker is not deleted (its Miniflare
  // instance could not be restarted without it).
  const users = [...state.scripts.values()].filter((s) => (s.version?.metadata.bindings ?? []).some((b) => b.type === "hyperdrive" && b.id === cfg.id));
  if (users.length) throw bad(`Hyperdrive config ${cfg.id} is bound by Worker(s) ${users.map((s) => s.name).join(", ")}`, CODES.HAS_DEPENDENTS);
  state.hyperdrives.delete(cfg.id);
  return null;
});

// ---------------------------------------------------------------------------
// Test-only endpoints (outside /client/v4)
// ---------------------------------------------------------------------------

function scriptReport(name) {
  const s = state.scripts.get(name);
  if (!s) return { deployed: false, scheduled: { fired: 0, ok: 0, failed: 0 }, queue: { batches: 0, ok: 0, failed: 0 }, logs: [], bindings: [], crons: [], consumer: null };
  const c = consumersOfScript(name)[0];
  return {
    deployed: s.deployed && !!s.runner,
    scheduled: s.scheduled,
    queue: s.queueStats,
    logs: s.logs,
    bindings: (s.version?.metadata.bindings ?? []).map((b) => ({ name: b.name, type: b.type })),
    crons: s.schedules.map((x) => x.cron),
    consumer: c ? { queue_name: c.queue.queue_name, queue_id: c.queue.queue_id, ...consumerResult(c.consumer) } : null,
  };
}

async function handleLocal(req, res, url) {
  if (url.pathname === "/__local/requests") {
    if (req.method === "GET") return sendJson(res, 200, state.requests);
    if (req.method === "DELETE") { state.requests = []; return sendJson(res, 200, { cleared: true }); }
  }
  let m = /^\/__local\/scripts\/([^/]+)$/.exec(url.pathname);
  if (m && req.method === "GET") return sendJson(res, 200, scriptReport(decodeURIComponent(m[1])));
  m = /^\/__local\/scripts\/([^/]+)\/scheduled$/.exec(url.pathname);
  if (m && req.method === "POST") {
    const s = state.scripts.get(decodeURIComponent(m[1]));
    if (!s?.runner) return sendJson(res, 404, { outcome: "not-deployed" });
    return sendJson(res, 200, await fireScheduled(s));
  }
  return sendJson(res, 404, { error: `no local endpoint ${req.method} ${url.pathname}` });
}

// ---------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

async function readBody(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  return Buffer.concat(chunks);
}

function checkAuth(req) {
  if (!API_TOKEN) return;
  const header = req.headers.authorization ?? "";
  if (!/^Bearer /.test(header)) throw new ApiError(403, CODES.AUTH, "Authentication error: missing 'Authorization: Bearer <token>' header");
  if (header.slice(7).trim() !== API_TOKEN) throw new ApiError(403, CODES.AUTH, "Authentication error: invalid API token");
}

async function handleApi(req, res, url) {
  const apiPath = url.pathname.slice(API_PREFIX.length) || "/";
  const contentType = req.headers["content-type"] ?? null;
  const raw = await readBody(req);
  const ctx = { contentType, userAgent: req.headers["user-agent"], query: Object.fromEntries(url.searchParams), searchParams: url.searchParams, parts: [] };
  const record = { method: req.method, path: apiPath, query: ctx.query, content_type: contentType };
  if (url.searchParams.getAll("name").length > 1) record.query = { ...ctx.query, name: url.searchParams.getAll("name") };
  let status = 200;
  let body;
  try {
    if (raw.length && /^multipart\/form-data/i.test(contentType ?? "")) {
      ctx.parts = parseMultipart(raw, contentType);
      record.parts = ctx.parts.map(describePart);
    } else if (raw.length) {
      try { ctx.json = JSON.parse(raw.toString("utf8")); record.json = ctx.json; } catch (e) { ctx.jsonError = e.message; }
    }
    checkAuth(req);
    const found = routes.filter((r) => r.re.test(apiPath));
    const r = found.find((x) => x.method === req.method);
    if (!r) {
      const allowed = found.map((x) => x.method);
      throw new ApiError(found.length ? 405 : 404, CODES.NO_ROUTE, `No route for ${req.method} ${apiPath}${allowed.length ? ` (this path accepts ${allowed.join(", ")})` : ""}`);
    }
    const match = r.re.exec(apiPath);
    const params = Object.fromEntries(r.keys.map((k, i) => [k, decodeURIComponent(match[i + 1])]));
    const result = await r.handler(ctx, params);
    body = result && result.__list ? envelope(result.__list, { resultInfo: result.resultInfo }) : envelope(result ?? null);
  } catch (err) {
    if (!(err instanceof ApiError)) { console.error("internal error:", err); err = new ApiError(500, 10013, `internal error: ${err?.message ?? err}`); }
    status = err.status;
    body = errorEnvelope(err);
  }
  record.status = status;
  state.requests.push(record);
  debug(req.method, apiPath, status);
  sendJson(res, status, body);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://127.0.0.1");
  const handler = url.pathname.startsWith(`${API_PREFIX}/`) ? handleApi : url.pathname.startsWith("/__local/") ? handleLocal : null;
  if (!handler) return sendJson(res, 404, errorEnvelope(new ApiError(404, CODES.NO_ROUTE, `No route for ${req.method} ${url.pathname} (the API lives under ${API_PREFIX})`)));
  handler(req, res, url).catch((e) => { console.error("request failed:", e); if (!res.headersSent) sendJson(res, 500, { error: String(e) }); });
});

fs.mkdirSync(STATE_DIR, { recursive: true });
const cronTimer = setInterval(cronTick, CRON_INTERVAL_MS);

server.listen(PORT, "127.0.0.1", () => {
  const port = server.address().port;
  process.stdout.write(JSON.stringify({ port, base_url: `http://127.0.0.1:${port}${API_PREFIX}` }) + "\n");
  info(`listening on 127.0.0.1:${port}; state in ${STATE_DIR}; crons every ${CRON_INTERVAL_MS} ms`);
});

let stopping = false;
async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  info(`${signal}: stopping`);
  clearInterval(cronTimer);
  server.close();
  await Promise.all([...state.scripts.values()].map(stopRunner));
  process.exit(0);
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
