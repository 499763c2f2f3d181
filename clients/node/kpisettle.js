'use strict';
/**
 * A small kpisettle client for Node.js, written only from the .proto files in ../../proto:
 * it shows that a client nobody here wrote can list the services by server reflection,
 * settle with a bearer token and read a fee breakdown.
 *
 * Money stays text: every amount, rate and metric is an exact decimal string on the wire
 * and in the objects this module returns (int64 fields come back as strings too). A request
 * that carries a JavaScript number anywhere but in a date, a day count or a revision is
 * refused before it is sent, because a Number near money would round silently.
 */

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const descriptor = require('protobufjs/ext/descriptor');

/** The repository's own protos. */
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
/** grpc/reflection/v1{,alpha}/reflection.proto, as shipped by the grpc-node project. */
const REFLECTION_PROTO_ROOT = path.join(path.dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');

/**
 * How messages become JavaScript objects: proto field names (the names grpcurl and the
 * Python client print), int64 as strings, enums by name, and no invented defaults — a
 * field is present when the server sent it, as in proto JSON.
 */
const LOAD_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: false };

/** Whole-number fields that may be JavaScript numbers in a request; nothing else may. */
const INTEGER_FIELDS = new Set(['year', 'month', 'day', 'active_days', 'expected_revision']);

const DEFAULT_DEADLINE_SECONDS = 10;

/**
 * The include directories for google/api, google/rpc and google/type (googleapis), from
 * `protoPath` or else KPISETTLE_PROTO_PATH (directories joined by the path delimiter).
 * google/protobuf's own protos come with protobufjs.
 */
function googleapisDirs(protoPath) {
  const dirs = protoPath && protoPath.length ? protoPath : (process.env.KPISETTLE_PROTO_PATH || '').split(path.delimiter).filter(Boolean);
  if (!dirs.some((dir) => fs.existsSync(path.join(dir, 'google', 'type', 'date.proto')))) {
    throw new Error(
      'the googleapis protos (google/type/date.proto …) were not found: set KPISETTLE_PROTO_PATH to the directory holding them, ' +
        "e.g. from the repository root: export KPISETTLE_PROTO_PATH=\"$(.venv/bin/python -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])')\""
    );
  }
  return dirs;
}

/** A JavaScript number where the API wants exact decimal text. */
class NumberNearMoney extends TypeError {}

/** Refuses JavaScript numbers where the API wants exact decimal text. */
function assertMoneyIsText(value, where = 'request') {
  if (typeof value === 'number' || typeof value === 'bigint') {
    const field = where.slice(where.lastIndexOf('.') + 1);
    if (!(INTEGER_FIELDS.has(field) && Number.isSafeInteger(Number(value)))) {
      throw new NumberNearMoney(`${where}: ${String(value)} is a JavaScript number; amounts, metrics and rates must be exact decimal text (quote them)`);
    }
  } else if (Array.isArray(value)) {
    value.forEach((item, index) => assertMoneyIsText(item, `${where}[${index}]`));
  } else if (value !== null && typeof value === 'object') {
    for (const [key, item] of Object.entries(value)) assertMoneyIsText(item, `${where}.${key}`);
  }
}

/** The google.rpc.Status a kpisettle error carries, decoded: ErrorInfo and field violations. */
class StatusDecoder {
  constructor(dirs) {
    this.root = new protobuf.Root();
    this.root.resolvePath = (origin, target) => {
      for (const dir of dirs) {
        const candidate = path.join(dir, target);
        if (fs.existsSync(candidate)) return candidate;
      }
      return target;
    };
    this.root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
    this.status = this.root.lookupType('google.rpc.Status');
  }

  /** A plain object for a failed call: code name, message, reason, domain, metadata, violations. */
  describe(error) {
    const described = { code: grpc.status[error.code] || String(error.code), message: error.details || error.message };
    const raw = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
    if (!raw.length) return described;
    const status = this.status.decode(raw[0]);
    described.message = status.message;
    for (const detail of status.details) {
      const type = this.root.lookupType(detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1));
      const value = type.toObject(type.decode(detail.value), { longs: String, defaults: false });
      if (type.fullName === '.google.rpc.ErrorInfo') {
        Object.assign(described, { reason: value.reason, domain: value.domain, metadata: value.metadata || {} });
      } else if (type.fullName === '.google.rpc.BadRequest') {
        described.field_violations = value.field_violations || [];
      }
    }
    return described;
  }
}

/** An error the server (or the transport) returned, with the rich details decoded. */
class KpisettleError extends Error {
  constructor(details, cause) {
    super(`${details.code}: ${details.message}${details.reason ? ` [${details.reason}]` : ''}`, { cause });
    this.name = 'KpisettleError';
    this.details = details;
  }
}

/** A connection to a kpisettle server that sends one bearer token with each call. */
class KpisettleClient {
  /**
   * @param {string} target "host:port"
   * @param {object} options token (bearer token), protoPath (googleapis include dirs),
   *   credentials (grpc.ChannelCredentials, plaintext by default: a local server),
   *   deadlineSeconds (per call)
   */
  constructor(target, { token = '', protoPath, credentials, deadlineSeconds = DEFAULT_DEADLINE_SECONDS } = {}) {
    const dirs = googleapisDirs(protoPath);
    const definition = protoLoader.loadSync(['kpisettle/v1/settlement_service.proto'], { ...LOAD_OPTIONS, includeDirs: [PROTO_ROOT, ...dirs] });
    const { SettlementService } = grpc.loadPackageDefinition(definition).kpisettle.v1;
    this.settlements = new SettlementService(target, credentials || grpc.credentials.createInsecure());
    this.errors = new StatusDecoder(dirs);
    this.token = token;
    this.deadlineSeconds = deadlineSeconds;
  }

  close() {
    this.settlements.close();
  }

  _unary(method, request) {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    const deadline = new Date(Date.now() + this.deadlineSeconds * 1000);
    return new Promise((resolve, reject) => {
      this.settlements[method](request, metadata, { deadline }, (error, response) => {
        if (error) reject(new KpisettleError(this.errors.describe(error), error));
        else resolve(response);
      });
    });
  }

  /** Settle: `request` is a SettleRequest object with proto field names and money as strings. */
  settle(request) {
    assertMoneyIsText(request);
    return this._unary('Settle', request);
  }

  /** GetFeeBreakdown of "settlements/{id}". */
  getFeeBreakdown(name) {
    return this._unary('GetFeeBreakdown', { name });
  }
}

/** Runs one reflection stream: writes the requests, collects the answers. */
function reflect(target, version, requests, { credentials, deadlineSeconds = DEFAULT_DEADLINE_SECONDS } = {}) {
  const definition = protoLoader.loadSync(`grpc/reflection/${version}/reflection.proto`, { ...LOAD_OPTIONS, includeDirs: [REFLECTION_PROTO_ROOT] });
  const { ServerReflection } = grpc.loadPackageDefinition(definition).grpc.reflection[version];
  const client = new ServerReflection(target, credentials || grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + deadlineSeconds * 1000);
  return new Promise((resolve, reject) => {
    const answers = [];
    const call = client.ServerReflectionInfo({ deadline });
    call.on('data', (answer) => answers.push(answer));
    call.on('error', (error) => {
      client.close();
      reject(error);
    });
    call.on('end', () => {
      client.close();
      resolve(answers);
    });
    for (const request of requests) call.write(request);
    call.end();
  });
}

/**
 * The services a server offers and each one's methods, by server reflection (no token:
 * reflection is public). Tries grpc.reflection.v1, then v1alpha for older servers.
 */
async function listServices(target, options = {}) {
  for (const version of ['v1', 'v1alpha']) {
    let listed;
    try {
      [listed] = await reflect(target, version, [{ list_services: '*' }], options);
    } catch (error) {
      if (error.code === grpc.status.UNIMPLEMENTED && version === 'v1') continue;
      throw error;
    }
    if (!listed || !listed.list_services_response) {
      throw new Error(`reflection could not list the services: ${listed && listed.error_response ? listed.error_response.error_message : 'no answer'}`);
    }
    const names = listed.list_services_response.service.map((service) => service.name).sort();
    const files = await reflect(target, version, names.map((name) => ({ file_containing_symbol: name })), options);
    return names.map((name, index) => ({ name, methods: methodsOf(name, files[index]) }));
  }
  throw new Error('unreachable');
}

/** The methods of service `name`, read from the file descriptors reflection returned. */
function methodsOf(name, answer) {
  if (!answer.file_descriptor_response) {
    throw new Error(`reflection could not describe ${name}: ${answer.error_response ? answer.error_response.error_message : 'no answer'}`);
  }
  for (const bytes of answer.file_descriptor_response.file_descriptor_proto) {
    const file = descriptor.FileDescriptorProto.decode(bytes);
    for (const service of file.service) {
      if (`${file.package ? `${file.package}.` : ''}${service.name}` === name) {
        return service.method.map((method) => ({
          name: method.name,
          input_type: method.inputType.replace(/^\./, ''),
          output_type: method.outputType.replace(/^\./, ''),
          client_streaming: Boolean(method.clientStreaming),
          server_streaming: Boolean(method.serverStreaming),
        }));
      }
    }
  }
  throw new Error(`reflection returned no descriptor of ${name}`);
}

module.exports = { KpisettleClient, KpisettleError, NumberNearMoney, listServices, assertMoneyIsText, googleapisDirs, PROTO_ROOT };
