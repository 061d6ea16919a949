// Test-only launcher: an in-memory PLC directory plus a real reference PDS
// (@atproto/pds) in dev mode, both bound to 127.0.0.1 on free ports.
//
// Usage:  <node 22> server.mjs [--rate-limits] [--no-stdin-watch]
//
// Environment:
//   ANISOTA_TEST_PDS_RATE_LIMITS=1   same as --rate-limits (off by default)
//   ANISOTA_TEST_PDS_DEBUG=1         PDS/PLC logs (pino, JSON) on stderr (the logger
//                                    reopens /dev/stderr: redirect it to a pipe or
//                                    with `2>>file`, not `2>file`, or lines clobber)
//   ANISOTA_TEST_PDS_LOG_LEVEL=...   log level when debugging (default "info")
//
// On success exactly one JSON line is printed on stdout:
//   {"ready": true, "url": "http://127.0.0.1:PORT", "plc": "http://127.0.0.1:PORT2",
//    "adminPassword": "...", "jwtSecret": "...", "serviceDid": "did:web:localhost",
//    "rateLimits": false, "dataDir": "/tmp/anisota-test-pds-XXXX", "pid": 1234}
// On a start-up failure one line {"ready": false, "error": "..."} is printed and
// the process exits with status 1.
//
// The process stops (and deletes its data directory) on SIGTERM/SIGINT and when
// its stdin reaches end-of-file, so a parent that dies without cleaning up does
// not leave a PDS behind. Pass --no-stdin-watch to run it by hand with stdin
// redirected from /dev/null.

import crypto from 'node:crypto'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'

const argv = process.argv.slice(2)
const truthy = (v) => /^(1|true|yes|on)$/i.test(v ?? '')
const rateLimits =
  argv.includes('--rate-limits') || truthy(process.env.ANISOTA_TEST_PDS_RATE_LIMITS)
const watchStdin = !argv.includes('--no-stdin-watch')
const debug = truthy(process.env.ANISOTA_TEST_PDS_DEBUG)

// The atproto loggers read these when their modules load, so set them before
// the dynamic imports below. pino would log to stdout by default, which is
// reserved for the ready line.
if (debug) {
  process.env.LOG_ENABLED = 'true'
  process.env.LOG_LEVEL = process.env.ANISOTA_TEST_PDS_LOG_LEVEL || 'info'
  process.env.LOG_DESTINATION = '/dev/stderr'
} else {
  process.env.LOG_ENABLED = 'false'
  delete process.env.LOG_DESTINATION
}

// Both servers call listen(port) without a host, which would bind every
// interface. Force loopback for anything listening in this process.
const LOOPBACK = '127.0.0.1'
const originalListen = net.Server.prototype.listen
net.Server.prototype.listen = function listenOnLoopback(...args) {
  const first = args[0]
  if (first !== null && typeof first === 'object' && !Array.isArray(first)) {
    if (first.path === undefined && first.fd === undefined && first.handle === undefined) {
      args[0] = { ...first, host: LOOPBACK }
    }
  } else if (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) {
    if (typeof args[1] === 'string') {
      args[1] = LOOPBACK
    } else {
      args.splice(1, 0, LOOPBACK)
    }
  } else if (first === undefined || typeof first === 'function') {
    args.splice(0, 0, 0, LOOPBACK)
  }
  return originalListen.apply(this, args)
}

const tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'anisota-test-pds-'))
const removeTmpDir = () => {
  try {
    fs.rmSync(tmpDir, { recursive: true, force: true })
  } catch {
    // best effort
  }
}
process.on('exit', removeTmpDir)

const log = (...parts) => {
  if (debug) process.stderr.write(`[test-pds] ${parts.join(' ')}\n`)
}

const freePort = () =>
  new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.unref()
    srv.once('error', reject)
    srv.listen(0, LOOPBACK, () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })

let plc = null
let pds = null
let stopping = null

const stop = (reason, code = 0) => {
  if (stopping) return stopping
  log('stopping:', reason)
  // Hard deadline: never linger, whatever the libraries do.
  setTimeout(() => {
    removeTmpDir()
    process.exit(code)
  }, 5000).unref()
  stopping = (async () => {
    try {
      if (pds) await pds.destroy()
    } catch (err) {
      log('pds destroy failed:', err?.stack ?? err)
    }
    try {
      if (plc) await plc.destroy()
    } catch (err) {
      log('plc destroy failed:', err?.stack ?? err)
    }
    removeTmpDir()
    process.exit(code)
  })()
  return stopping
}

process.on('SIGTERM', () => stop('SIGTERM'))
process.on('SIGINT', () => stop('SIGINT'))
process.on('SIGHUP', () => stop('SIGHUP'))
if (watchStdin) {
  process.stdin.on('data', () => {})
  process.stdin.on('end', () => stop('stdin closed'))
  process.stdin.on('close', () => stop('stdin closed'))
  process.stdin.on('error', () => stop('stdin error'))
  process.stdin.resume()
}
// A closed stdout (the parent went away) must not crash-loop us.
process.stdout.on('error', () => stop('stdout closed'))

const main = async () => {
  const [{ PDS, envToCfg, envToSecrets }, { PlcServer, Database }, { Secp256k1Keypair }] =
    await Promise.all([
      import('@atproto/pds'),
      import('@did-plc/server'),
      import('@atproto/crypto'),
    ])

  plc = PlcServer.create({ db: Database.mock(), port: 0 })
  const plcServer = await plc.start()
  const plcUrl = `http://${LOOPBACK}:${plcServer.address().port}`
  log('plc listening at', plcUrl)

  const rotationKey = await Secp256k1Keypair.create({ exportable: true })
  const recoveryKey = await Secp256k1Keypair.create({ exportable: true })
  const adminPassword = crypto.randomBytes(16).toString('hex')
  const jwtSecret = crypto.randomBytes(32).toString('hex')
  const rotationKeyHex = Buffer.from(await rotationKey.export()).toString('hex')

  const dataDirectory = path.join(tmpDir, 'data')
  const blobDirectory = path.join(tmpDir, 'blobs')
  fs.mkdirSync(dataDirectory, { recursive: true })
  fs.mkdirSync(blobDirectory, { recursive: true })

  // The port must be known before the PDS is configured (its public URL and
  // service DID are derived from it), so pick a free one and retry on a race.
  let lastErr = null
  for (let attempt = 0; attempt < 5 && !pds?.server; attempt++) {
    const port = await freePort()
    const env = {
      devMode: true,
      hostname: 'localhost',
      port,
      dataDirectory,
      blobstoreDiskLocation: blobDirectory,
      didPlcUrl: plcUrl,
      recoveryDidKey: recoveryKey.did(),
      plcRotationKeyK256PrivateKeyHex: rotationKeyHex,
      adminPassword,
      jwtSecret,
      serviceHandleDomains: ['.test'],
      inviteRequired: false,
      rateLimitsEnabled: rateLimits,
      disableSsrfProtection: true,
      crawlers: [],
    }
    const candidate = await PDS.create(envToCfg(env), envToSecrets(env))
    pds = candidate
    try {
      await candidate.start()
    } catch (err) {
      lastErr = err
      log('pds start failed on port', port, err?.message ?? err)
      pds = null
      try {
        await candidate.destroy()
      } catch {
        // ignore
      }
      if (err?.code !== 'EADDRINUSE') throw err
      continue
    }
    const url = `http://${LOOPBACK}:${port}`
    log('pds listening at', url)
    process.stdout.write(
      `${JSON.stringify({
        ready: true,
        url,
        plc: plcUrl,
        adminPassword,
        jwtSecret,
        serviceDid: candidate.ctx.cfg.service.did,
        rateLimits,
        dataDir: tmpDir,
        pid: process.pid,
      })}\n`,
    )
    return
  }
  throw lastErr ?? new Error('could not start the PDS')
}

main().catch((err) => {
  process.stderr.write(`[test-pds] start-up failed: ${err?.stack ?? err}\n`)
  try {
    process.stdout.write(`${JSON.stringify({ ready: false, error: String(err?.message ?? err) })}\n`)
  } catch {
    // ignore
  }
  stop('start-up failure', 1)
})
