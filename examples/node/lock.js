#!/usr/bin/env node
// lockd from Node.js, with @grpc/grpc-js and @grpc/proto-loader loading proto/ at run time (no
// code generation): the proof that any language with gRPC can use lockd.
//
//   node lock.js <host:port> <resource> [--ttl-ms 3000] [--hold-ms 2000] [--owner NAME]
//
// Takes the lock (one try). If it is held, prints "skipping <resource>: already running on
// <owner>" and exits 0: the scheduler pattern. Otherwise it "works" for --hold-ms while renewing
// the lease every third of the TTL (Extend with replace_ttl), then releases it. Exits 1 if a
// renewal finds the lock lost. Set LOCKD_API_KEY to send `authorization: Bearer <key>`.
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.join(__dirname, "..", "..", "proto");

function parseArgs(argv) {
  const [target, resource, ...rest] = argv;
  if (!target || !resource) {
    console.error("usage: node lock.js <host:port> <resource> [--ttl-ms N] [--hold-ms N] [--owner NAME]");
    process.exit(2);
  }
  const opts = { target, resource, ttlMs: 3000, holdMs: 2000, owner: `node pid ${process.pid}` };
  for (let i = 0; i < rest.length; i += 2) {
    const [flag, value] = [rest[i], rest[i + 1]];
    if (flag === "--ttl-ms") opts.ttlMs = Number(value);
    else if (flag === "--hold-ms") opts.holdMs = Number(value);
    else if (flag === "--owner") opts.owner = value;
    else throw new Error(`unknown option ${flag}`);
  }
  return opts;
}

/** A google.protobuf.Duration from milliseconds. */
function duration(ms) {
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

/** The LockService client, from proto/ (longs as strings: fencing tokens exceed 2^53). */
function lockService(target) {
  const definition = protoLoader.loadSync("lockd/v1/lock.proto", {
    includeDirs: [PROTO_DIR],
    longs: String,
    enums: String,
    defaults: true,
  });
  const { LockService } = grpc.loadPackageDefinition(definition).lockd.v1;
  return new LockService(target, grpc.credentials.createInsecure());
}

/** Calls `method` with the API key (if any) and a deadline; resolves with the reply. */
function call(client, method, request, timeoutMs = 5000) {
  const metadata = new grpc.Metadata();
  if (process.env.LOCKD_API_KEY) metadata.set("authorization", `Bearer ${process.env.LOCKD_API_KEY}`);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + timeoutMs }, (err, reply) =>
      err ? reject(err) : resolve(reply));
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const client = lockService(opts.target);
  // Chosen here, so a retried Acquire would get the same lease back; a secret: never printed.
  const token = `node-${crypto.randomUUID()}`;
  const { resource } = opts;

  const acquired = await call(client, "Acquire", {
    resource, ttl: duration(opts.ttlMs), owner: opts.owner, token,
  });
  if (!acquired.acquired) {
    const owner = acquired.holder ? acquired.holder.owner : "?";
    console.log(`skipping ${resource}: already running on ${owner}`);
    return 0;
  }
  console.log(`acquired ${resource} with fencing token ${acquired.lease.fencingToken}`);

  // Renew every third of the TTL while the "job" runs.
  const until = Date.now() + opts.holdMs;
  while (Date.now() < until) {
    await sleep(Math.min(opts.ttlMs / 3, until - Date.now()));
    const renewed = await call(client, "Extend", {
      resource, token, ttl: duration(opts.ttlMs), replaceTtl: true,
    });
    if (!renewed.extended) {
      console.log(`lost ${resource}: ${renewed.status}`);
      return 1;
    }
    console.log(`renewed ${resource}`);
  }

  const released = await call(client, "Release", { resource, token });
  console.log(`released ${resource}: ${released.status}`);
  client.close();
  return 0;
}

main().then((code) => process.exit(code), (err) => {
  console.error(`lock.js: ${err.message}`);
  process.exit(69);
});
