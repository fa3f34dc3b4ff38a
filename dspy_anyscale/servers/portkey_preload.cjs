// Copied next to the Portkey gateway by dspy_anyscale.servers.portkey (rewritten when it differs).
// Loaded with `node --require` before the Portkey gateway (an ES module) starts.
'use strict';
const net = require('node:net');

const HOST = '127.0.0.1';
const TAG = '[dspy-anyscale preload]';
const say = (msg) => process.stderr.write(`${TAG} ${msg}\n`);

// 1. Every TCP server listens on HOST only.  The gateway calls
//    serve({port}) -> server.listen(port, undefined, cb), i.e. all interfaces.
const originalListen = net.Server.prototype.listen;
const isNumericPort = (v) => typeof v === 'number' || (typeof v === 'string' && /^\d+$/.test(v));
net.Server.prototype.listen = function listen(...args) {
  const callback = typeof args[args.length - 1] === 'function' ? args.pop() : undefined;
  const first = args[0];
  let options = null;
  if (first !== null && typeof first === 'object') {
    const tcp = first.path === undefined && first.handle === undefined && first.fd === undefined && !first._handle;
    if (tcp) options = { ...first, host: HOST };
  } else if (first === undefined || isNumericPort(first)) {
    options = { port: first === undefined ? 0 : Number(first), host: HOST };
    const backlog = typeof args[1] === 'number' ? args[1] : args[2];
    if (typeof backlog === 'number') options.backlog = backlog;
  }
  if (options === null) {  // a pipe path or a handle: not ours to change
    return originalListen.apply(this, callback ? [...args, callback] : args);
  }
  this.once('listening', () => say(`listening on ${JSON.stringify(this.address())}`));
  return callback ? originalListen.call(this, options, callback) : originalListen.call(this, options);
};

// 2. fetch() returns a Response whose headers are mutable.  Native fetch responses
//    have immutable headers; the gateway's streaming path appends x-portkey-*
//    headers to them ("TypeError: immutable", Portkey gateway issues #1389, #1550).
//    The copy leaves out hop-by-hop headers (Connection, Keep-Alive), which the
//    gateway would otherwise forward to its client.
// 3. fetch() does not reuse connections (undici Agent with pipelining 0).  Servers
//    such as llama-server close the connection after a streamed response although
//    they announced keep-alive; when the gateway reuses it before the close arrives
//    the next request fails ("other side closed" / ECONNRESET -> HTTP 500).
const nativeFetch = globalThis.fetch;
const NativeResponse = globalThis.Response;  // before @hono/node-server replaces it
const NativeHeaders = globalThis.Headers;
const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304]);
const fixHeaders = process.env.DSPY_ANYSCALE_GATEWAY_NO_FETCH_FIX !== '1';
const keepAlive = process.env.DSPY_ANYSCALE_GATEWAY_KEEP_ALIVE === '1';
let freshConnections = null;  // Promise<Agent | undefined>
function noKeepAliveAgent() {
  // Node bundles undici without exporting it: take the Agent class from the global
  // dispatcher, which a data: fetch creates without touching the network.
  freshConnections ??= nativeFetch('data:,')
    .then((r) => r.arrayBuffer())
    .then(() => {
      const agent = new globalThis[Symbol.for('undici.globalDispatcher.1')].constructor({ pipelining: 0 });
      if (typeof agent.dispatch !== 'function') throw new Error('global dispatcher is not an undici Agent');
      return agent;
    })
    .catch((err) => {
      say(`no undici Agent (${err && err.message}); upstream connections are reused`);
      return undefined;
    });
  return freshConnections;
}
if (typeof nativeFetch === 'function' && (fixHeaders || !keepAlive)) {
  globalThis.fetch = async function fetch(input, init) {
    if (!keepAlive && init?.dispatcher === undefined) {
      const dispatcher = await noKeepAliveAgent();
      if (dispatcher !== undefined) init = { ...init, dispatcher };
    }
    const upstream = await nativeFetch(input, init);
    if (!fixHeaders) return upstream;
    let copy;
    try {
      const headers = new NativeHeaders(upstream.headers);
      // Hop-by-hop headers describe the upstream connection; the gateway would pass them on.
      const hopByHop = (headers.get('connection') || '').split(',').map((h) => h.trim()).filter(Boolean);
      for (const name of [...hopByHop, 'connection', 'keep-alive']) headers.delete(name);
      copy = new NativeResponse(NULL_BODY_STATUS.has(upstream.status) ? null : upstream.body, {
        status: upstream.status,
        statusText: upstream.statusText,
        headers,
      });
    } catch (err) {
      say(`mutable-headers fix not applied (${err && err.message}); returning the original response`);
      return upstream;
    }
    Object.defineProperty(copy, 'url', { value: upstream.url });
    Object.defineProperty(copy, 'redirected', { value: upstream.redirected });
    return copy;
  };
}
if (!fixHeaders) say('mutable-headers fix disabled (streaming fails with "TypeError: immutable")');
if (keepAlive) say('upstream keep-alive enabled');

// 4. Note outgoing connections to hosts other than loopback (nothing is blocked).
const originalConnect = net.Socket.prototype.connect;
const LOOPBACK = /^(localhost|127\.\d+\.\d+\.\d+|::1|::ffff:127\.\d+\.\d+\.\d+|\[::1\])$/i;
function targetOf(args) {
  const a = Array.isArray(args[0]) ? args[0] : args;  // net.connect passes normalized [options, cb]
  const first = a[0];
  if (first !== null && typeof first === 'object') {
    if (first.path !== undefined) return null;
    return `${first.host || first.hostname || 'localhost'}:${first.port}`;
  }
  if (isNumericPort(first)) return `${typeof a[1] === 'string' ? a[1] : 'localhost'}:${first}`;
  return null;
}
net.Socket.prototype.connect = function connect(...args) {
  try {
    const target = targetOf(args);
    if (target !== null && !LOOPBACK.test(target.slice(0, target.lastIndexOf(':')))) {
      say(`outgoing connection to ${target}`);
    }
  } catch (err) {
    // never let the notice break a connection
  }
  return originalConnect.apply(this, args);
};
