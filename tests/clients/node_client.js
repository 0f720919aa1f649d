// Sends calls with a real Node client library to a Segment-compatible intake; driven by tests/test_serve_js.py.
//
//   node node_client.js <customerio|segment> <calls.json> <out.json>
//
// Environment: NODE_PATH (where the npm packages are), CIO_SYNC_HOST (the intake's URL), CIO_SYNC_WRITE_KEY.
// calls.json is a list of [method, params] (method: identify, track, page, screen, group or alias, params as the
// library takes them). The script makes every call with a callback, then closeAndFlush(), and writes to out.json
// what each callback saw: {"results": [{"index", "messageId", "type", "error"}], "errors": [...]}, errors being the
// library's 'error' events.
'use strict'

const fs = require('fs')

const [library, callsPath, outPath] = process.argv.slice(2)
const host = process.env.CIO_SYNC_HOST
const writeKey = process.env.CIO_SYNC_WRITE_KEY
if (!['customerio', 'segment'].includes(library) || !callsPath || !outPath || !host || !writeKey) {
  console.error('usage: CIO_SYNC_HOST=... CIO_SYNC_WRITE_KEY=... node node_client.js customerio|segment CALLS OUT')
  process.exit(2)
}

// Each library's own option names: a batch of 10 calls, a short flush interval, few retries, a bounded request.
const common = { writeKey, host, path: '/v1/batch', flushInterval: 200, maxRetries: 2, httpRequestTimeout: 10000 }
const analytics =
  library === 'customerio'
    ? new (require('@customerio/cdp-analytics-node').Analytics)({ ...common, maxEventsInBatch: 10 })
    : new (require('@segment/analytics-node').Analytics)({ ...common, flushAt: 10 })

const errors = []
analytics.on('error', (err) => errors.push(String(err && (err.reason || err.code || err))))

const calls = JSON.parse(fs.readFileSync(callsPath, 'utf8'))
const results = []
for (const [index, [method, params]] of calls.entries()) {
  analytics[method](params, (err, ctx) => {
    results.push({
      index,
      messageId: ctx && ctx.event.messageId,
      type: ctx && ctx.event.type,
      error: err ? String(err) : null,
    })
  })
}

analytics
  .closeAndFlush({ timeout: 30000 })
  .then(() => {
    fs.writeFileSync(outPath, JSON.stringify({ results, errors }))
  })
  .catch((err) => {
    console.error(String(err))
    process.exit(1)
  })
