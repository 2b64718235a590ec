// A vendor backend that sends DPoP proofs with panva's oauth4webapi (RFC 9449):
// discovery at the service's issuer (RFC 8414), then one token request of any grant
// (genericTokenEndpointRequest) with a DPoP handle over a fresh key, retried once
// when the service answers use_dpop_nonce (RFC 9449 §8).
//
// Input, one JSON object on stdin:
//   {"issuer": URL, "client_id": ID, "client_secret": S, "grant_type": URN,
//    "parameters": {...}, "alg": "ES256" (optional), "requests": 1 (optional)}
// Output, one JSON object on stdout:
//   {"jkt": thumbprint of the DPoP key, "attempts": token requests sent,
//    "results": [{"token_type", "access_token", "scope"} | {"error", "error_description"}]}
import * as oauth from 'oauth4webapi'

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'))

const issuer = new URL(input.issuer)
const insecure = { [oauth.allowInsecureRequests]: issuer.protocol === 'http:' }
const as = await oauth.processDiscoveryResponse(
  issuer, await oauth.discoveryRequest(issuer, { algorithm: 'oauth2', ...insecure }))
const client = { client_id: input.client_id }
const clientAuth = oauth.ClientSecretBasic(input.client_secret)
const keyPair = await oauth.generateKeyPair(input.alg || 'ES256')
const DPoP = oauth.DPoP(client, keyPair)

let attempts = 0
async function request () {
  attempts += 1
  const response = await oauth.genericTokenEndpointRequest(
    as, client, clientAuth, input.grant_type, new URLSearchParams(input.parameters), { DPoP, ...insecure })
  return oauth.processGenericTokenEndpointResponse(as, client, response)
}

const results = []
for (let i = 0; i < (input.requests || 1); i++) {
  let answer
  try {
    try {
      answer = await request()
    } catch (err) {
      if (!oauth.isDPoPNonceError(err)) throw err
      answer = await request() // the handle now holds the DPoP-Nonce the service sent
    }
    results.push({ token_type: answer.token_type, access_token: answer.access_token, scope: answer.scope })
  } catch (err) {
    results.push({ error: err.error || err.code || String(err), error_description: err.error_description || err.message })
  }
}
process.stdout.write(JSON.stringify({ jkt: await DPoP.calculateThumbprint(), attempts, results }) + '\n')
