"""FHIR R4 AuditEvent rendering of exchange decisions, after IHE Basic Audit Log
Patterns (BALP) "OAuth token" pattern. Never a token or a secret: the minted
token is named only by its jti, as urn:ietf:params:oauth:jti:<jti>."""
from __future__ import annotations

import uuid

from . import urns

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = {"system": DCM, "code": "110114", "display": "User Authentication"}
REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
        "display": "RESTful Operation"}
BALP_TOKEN = {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
              "code": "XrequestId", "display": "request id"}
ROLE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
OBJ_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"


def audit_event(e: dict, service: str) -> dict:
    granted = e.get("outcome") == "granted"
    ev = {
        "resourceType": "AuditEvent",
        "id": uuid.uuid5(uuid.NAMESPACE_URL, f"{service}#{e.get('time')}#{e.get('jti') or ''}#{e.get('client_id')}").hex,
        "meta": {"profile": ["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.SAMLaccessTokenUse.Minimal"]},
        "type": EVENT_TYPE,
        "subtype": [{"system": "urn:ietf:rfc:8693", "code": urns.TOKEN_EXCHANGE, "display": "token exchange"}],
        "action": "E",
        "recorded": e["time"],
        "outcome": "0" if granted else "4",
        "outcomeDesc": "granted" if granted else f"refused: {e.get('error') or 'unknown'}",
        "agent": [
            {"type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
             "who": {"identifier": {"system": f"{service}/clients", "value": e.get("client_id") or "unknown"}},
             "requestor": True},
            {"type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
             "who": {"identifier": {"value": service}, "display": "token-exchange (authorizer)"},
             "requestor": False},
        ],
        "source": {"observer": {"display": service},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
    }
    if e.get("subject"):
        ev["agent"].insert(1, {"type": {"coding": [{"system": ROLE, "code": "IRCP", "display": "information recipient"}]},
                               "who": {"identifier": {"system": e.get("issuer") or "urn:unknown", "value": e["subject"]}},
                               "requestor": False})
    entities = []
    if e.get("jti"):
        entities.append({"what": {"identifier": {"value": urns.JTI_URN_PREFIX + e["jti"]}},
                         "type": {"system": ENTITY_TYPE, "code": "4", "display": "Other"},
                         "description": "minted access token"})
    if e.get("source_patient"):
        entities.append(_patient(e.get("issuer") or "urn:unknown", e["source_patient"], "source patient"))
    if e.get("target_patient"):
        mapped = f" (mapped by a {e['link']} link)" if e.get("link") else ""
        entities.append(_patient(e.get("target") or "urn:unknown", e["target_patient"], "target patient" + mapped))
    detail = [{"type": k, "valueString": e[k]} for k in ("scope_requested", "scope_granted", "target") if e.get(k)]
    if e.get("link"):  # how the patient was mapped: table, matched, matched-stored, none, ambiguous, unavailable
        detail.append({"type": "patient-mapping", "valueString": e["link"]})
    if detail:
        entities.append({"type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                         "what": {"display": "token request"}, "detail": detail})
    if entities:
        ev["entity"] = entities
    return ev


def _patient(system, value, description):
    return {"what": {"identifier": {"system": system, "value": value}},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJ_ROLE, "code": "1", "display": "Patient"},
            "description": description}


def fhir_bundle(events, service: str) -> dict:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": audit_event(e, service)} for e in events]}
