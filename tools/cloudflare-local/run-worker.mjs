// Runs a Worker built by worker-build in Miniflare (workerd) and fires its
// cron trigger ROUNDS times, or sends QUEUE_MESSAGES wake-ups to its queue
// consumer and waits for them to be consumed. Prints one JSON line.
//   BUILD_DIR, DATABASE_URL, ROUNDS, QUEUE_MESSAGES (JSON array of bodies)
import { Miniflare, Log, LogLevel } from "miniflare";
import path from "node:path";

const build = process.env.BUILD_DIR;
const url = process.env.DATABASE_URL;
const rounds = Number(process.env.ROUNDS ?? "1");
const messages = JSON.parse(process.env.QUEUE_MESSAGES ?? "[]");
const logs = [];
const capture = (stream) => stream.on("data", (chunk) => logs.push(...String(chunk).split("\n").filter(Boolean)));
const mf = new Miniflare({
  log: new Log(LogLevel.WARN),
  handleRuntimeStdio: (stdout, stderr) => { capture(stdout); capture(stderr); },
  modules: [
    { type: "ESModule", path: path.join(build, "index.js") },
    { type: "CompiledWasm", path: path.join(build, "index_bg.wasm") },
  ],
  modulesRoot: build,
  compatibilityDate: "2026-04-26",
  cf: false,
  bindings: { DATABASE_URL: url },
  queueProducers: { WAKE: { queueName: "chronicle-wake" } },
  queueConsumers: { "chronicle-wake": { maxBatchSize: 10, maxBatchTimeout: 1, maxRetries: 2 } },
});
try {
  await mf.ready;
  const worker = await mf.getWorker();
  const outcomes = [];
  for (let i = 0; i < rounds; i++) {
    outcomes.push(await worker.scheduled({ cron: "*/1 * * * *", scheduledTime: new Date() }));
  }
  if (messages.length > 0) {
    const before = logs.filter((l) => l.includes("chronicle projection step")).length;
    const producer = await mf.getQueueProducer("WAKE");
    await producer.sendBatch(messages.map((body) => ({ body })));
    const deadline = Date.now() + 30000;
    while (logs.filter((l) => l.includes("chronicle projection step")).length === before && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  console.log(JSON.stringify({ outcomes, logs }));
} finally {
  await mf.dispose();
}
