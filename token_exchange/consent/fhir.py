"""Consents and denials as FHIR R4 ``Consent`` resources (contract: `consent export
--format fhir`).

One resource per consent (``status`` ``active``, or ``inactive`` once withdrawn or
expired) and one per denial (``rejected``): ``scope`` patient-privacy, ``category``
LOINC 59284-0 (Patient Consent), ``patient`` ``{source}/Patient/{patient}``,
``performer`` the signer (its ``fhirUser``, else the issuer and ``sub``),
``dateTime`` the decision, ``policyRule`` OPTIN, and ``provision``: ``type``
permit (deny for a denial), ``period`` granted to expires (to the withdrawal
when earlier), ``actor`` the client (role IRCP, information recipient) and the
target (role CST, custodian), and the SMART scopes: one ``action`` per scope
(consentaction ``access`` for read/search, ``correct`` for create/update/delete,
``text`` the scope itself) and the FHIR resource types in ``class``
(``http://hl7.org/fhir/resource-types``; none listed for ``*``).
"""
from __future__ import annotations

from datetime import datetime, timezone

from .. import scopes

PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).isoformat()


def status(c, now: datetime) -> str:
    """active | withdrawn | expired (| denied) of one consent row."""
    if c.decision == "denied":
        return "denied"
    if c.withdrawn is not None:
        return "withdrawn"
    expires = c.expires if c.expires.tzinfo else c.expires.replace(tzinfo=timezone.utc)
    return "active" if expires > now else "expired"


def _actions(scope_text: str):
    actions, types = [], []
    for s in scopes.parse(scope_text, strict=False).scopes:
        codes = [code for code, letters in (("access", "rs"), ("correct", "cud")) if s.perms & set(letters)]
        actions.append({"coding": [{"system": ACTION, "code": code} for code in codes], "text": s.v2()})
        if s.resource != "*" and s.resource not in types:
            types.append(s.resource)
    return actions, [{"system": "http://hl7.org/fhir/resource-types", "code": t} for t in types]


def consent_resource(row, service: str, clients: dict, now: datetime) -> dict:
    c = row.Consent
    st = status(c, now)
    end = c.expires if c.withdrawn is None or c.withdrawn > c.expires else c.withdrawn
    actions, classes = _actions(c.scopes)
    client = clients.get(c.client_id)
    res = {
        "resourceType": "Consent",
        "id": c.id,
        "identifier": [{"system": f"{service}/consents", "value": c.id}],
        "status": {"active": "active", "denied": "rejected"}.get(st, "inactive"),
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy", "display": "Privacy Consent"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
        "dateTime": _iso(c.granted),
        "performer": [{"reference": c.signer} if c.signer else
                      {"identifier": {"system": c.issuer, "value": c.sub}}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {
            "type": "deny" if st == "denied" else "permit",
            "period": {"start": _iso(c.granted), "end": _iso(end)},
            "actor": [
                {"role": {"coding": [{"system": PARTICIPATION, "code": "IRCP", "display": "information recipient"}]},
                 "reference": {"identifier": {"system": f"{service}/clients", "value": c.client_id},
                               "display": (client.name if client is not None and client.name else c.client_id)}},
                {"role": {"coding": [{"system": PARTICIPATION, "code": "CST", "display": "custodian"}]},
                 "reference": {"identifier": {"system": "urn:ietf:rfc:3986", "value": row.target_url},
                               "display": row.target_name or row.target_url}},
            ],
            "action": actions,
        },
    }
    if classes:
        res["provision"]["class"] = classes
    if c.patient:
        res["patient"] = {"reference": f"{c.source}/Patient/{c.patient}" if c.source else f"Patient/{c.patient}"}
    return res


def bundle(rows, service: str, clients: dict) -> dict:
    now = datetime.now(timezone.utc)
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"{service}/consents/{r.Consent.id}",
                       "resource": consent_resource(r, service, clients, now)} for r in rows]}
