// Sends one user's messages with a stock Node library, unchanged but for its host.
// Usage: node send.cjs segment|rudderstack HOST WRITE_KEY TAG
// Prints one JSON line {"library", "errors"} and exits non-zero if the library reported an error.
'use strict'

const [lib, host, writeKey, tag] = process.argv.slice(2)
const userId = `${tag}-user`
const errors = []
const messages = [
  ['identify', { userId, traits: { email: `${tag}@example.com` } }],
  ['track', { userId, event: 'Order Completed', properties: { order_id: `${tag}-o1`, revenue: 99.5 } }],
  ['page', { userId, category: 'Shop', name: 'Home', properties: { path: '/' } }],
  ['screen', { userId, name: 'Cart' }],
  ['group', { userId, groupId: `${tag}-g`, traits: { name: 'Tea lovers' } }],
  ['alias', { previousId: `${tag}-anon`, userId }],
]

async function segment() {
  const { Analytics } = require('@segment/analytics-node')
  const client = new Analytics({ writeKey, host, flushAt: 100, flushInterval: 200, maxRetries: 2 })
  client.on('error', (err) => errors.push(String(err && (err.reason || err.message || err.code || err))))
  for (const [kind, msg] of messages) client[kind](msg)
  await client.closeAndFlush({ timeout: 20000 })
}

async function rudderstack() {
  const Analytics = require('@rudderstack/rudder-sdk-node')
  const client = new Analytics(writeKey, {
    dataPlaneUrl: host,
    flushAt: 100,
    retryCount: 2,
    logLevel: 'error',
    errorHandler: (err) => errors.push(String(err && (err.message || err))),
  })
  for (const [kind, msg] of messages) client[kind](msg)
  await new Promise((resolve) => client.flush((err) => { if (err) errors.push(String(err.message || err)); resolve() }))
}

const run = { segment, rudderstack }[lib]
if (!run) {
  console.error(`unknown library ${lib}`)
  process.exit(2)
}
run()
  .catch((err) => errors.push(String(err && (err.stack || err))))
  .finally(() => {
    console.log(JSON.stringify({ library: lib, errors }))
    process.exit(errors.length ? 1 : 0)
  })
