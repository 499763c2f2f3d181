#!/usr/bin/env node
'use strict';
/**
 * kpisettle from Node.js, for people who do not use the Python tools. Prints JSON (money as
 * exact decimal strings). Exit codes as the Python `kpisettle`: 0 done, 1 the server refused
 * the call (the error and its details as JSON on stderr), 2 usage or connection errors.
 */

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const { KpisettleClient, KpisettleError, NumberNearMoney, listServices } = require('./kpisettle');

const USAGE = `usage: node cli.js [--target HOST:PORT] [--token TOKEN] [--proto-path DIR]... [--deadline SECONDS] COMMAND

commands:
  list              the services and their methods, by server reflection (no token needed)
  settle [FILE]     settle one SettleRequest given as JSON (proto field names, money as strings)
                    in FILE or on standard input; prints the SettleResponse
  breakdown NAME    the fee breakdown of settlements/...; prints the GetFeeBreakdownResponse

environment: KPISETTLE_TARGET (default 127.0.0.1:50051), KPISETTLE_TOKEN, KPISETTLE_PROTO_PATH
(the directory holding google/api, google/rpc and google/type protos; see README.md)`;

/** Connection failures are exit 2, like a usage error: nothing was decided. */
const CONNECTION_CODES = new Set(['UNAVAILABLE', 'DEADLINE_EXCEEDED']);

class UsageError extends Error {}

function parse(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        target: { type: 'string', default: process.env.KPISETTLE_TARGET || '127.0.0.1:50051' },
        token: { type: 'string', default: process.env.KPISETTLE_TOKEN || '' },
        'proto-path': { type: 'string', multiple: true, default: [] },
        deadline: { type: 'string', default: '10' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (error) {
    throw new UsageError(error.message);
  }
  const deadlineSeconds = Number(parsed.values.deadline);
  if (!(deadlineSeconds > 0)) throw new UsageError(`--deadline must be a positive number of seconds, not ${parsed.values.deadline}`);
  return { ...parsed.values, deadlineSeconds, positionals: parsed.positionals };
}

function readRequest(file) {
  try {
    return JSON.parse(fs.readFileSync(file === undefined || file === '-' ? 0 : file, 'utf8'));
  } catch (error) {
    throw new UsageError(`cannot read the request: ${error.message}`);
  }
}

async function run(argv) {
  const options = parse(argv);
  const [command, argument, ...rest] = options.positionals;
  if (options.help) {
    process.stdout.write(`${USAGE}\n`);
    return undefined;
  }
  if (rest.length) throw new UsageError(`unexpected arguments: ${rest.join(' ')}`);
  if (command === 'list') {
    if (argument !== undefined) throw new UsageError('list takes no argument');
    return listServices(options.target, { deadlineSeconds: options.deadlineSeconds });
  }
  if (command !== 'settle' && command !== 'breakdown') throw new UsageError(command ? `unknown command: ${command}` : 'a command is required');
  if (command === 'breakdown' && !argument) throw new UsageError('breakdown needs a settlement name');
  const request = command === 'settle' ? readRequest(argument) : null;
  let client;
  try {
    client = new KpisettleClient(options.target, { token: options.token, protoPath: options['proto-path'], deadlineSeconds: options.deadlineSeconds });
  } catch (error) {
    throw new UsageError(error.message);
  }
  try {
    return command === 'settle' ? await client.settle(request) : await client.getFeeBreakdown(argument);
  } catch (error) {
    if (error instanceof NumberNearMoney) throw new UsageError(error.message);
    throw error;
  } finally {
    client.close();
  }
}

async function main() {
  try {
    const result = await run(process.argv.slice(2));
    if (result !== undefined) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`kpisettle-node: ${error.message}\n(node cli.js --help for usage)\n`);
      return 2;
    }
    const details = error instanceof KpisettleError ? error.details : { code: grpc.status[error.code] || 'UNKNOWN', message: error.details || error.message };
    process.stderr.write(`${JSON.stringify({ error: details }, null, 2)}\n`);
    return CONNECTION_CODES.has(details.code) ? 2 : 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
