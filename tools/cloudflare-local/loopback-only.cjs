// Preloaded into wrangler by record-wrangler.mjs (NODE_OPTIONS=--require): any
// TCP connection to a host other than loopback fails at once, so wrangler can
// talk to local-cloudflare and nothing else (no update check, metrics, Sentry).
"use strict";
const net = require("node:net");
const LOOPBACK = new Set(["127.0.0.1", "::1", "localhost", "::ffff:127.0.0.1"]);
function targetHost(args) {
  const a = args[0];
  if (Array.isArray(a)) return targetHost(a); // internal normalized form
  if (a && typeof a === "object") return a.host ?? a.hostname ?? "localhost";
  if (typeof a === "number") return typeof args[1] === "string" ? args[1] : "localhost";
  return null; // a path (IPC socket): allowed
}
const connect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  const host = targetHost(args);
  if (host !== null && !LOOPBACK.has(String(host).replace(/^\[|\]$/g, ""))) {
    const err = new Error(`loopback-only: connection to ${host} refused by record-wrangler`);
    err.code = "ECONNREFUSED";
    process.nextTick(() => this.destroy(err));
    return this;
  }
  return connect.apply(this, args);
};
