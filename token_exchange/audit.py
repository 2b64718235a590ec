"""Audit records: the one builder of every record (exchange decisions, consent
decisions and withdrawals, admin events), and their FHIR R4 AuditEvent rendering
after IHE Basic Audit Log Patterns (BALP) "OAuth token" pattern.

Never a token or a secret: the minted token is named only by its jti, as
urn:ietf:params:oauth:jti:<jti>. Every writer (the token pipeline, the consent
pages, the CLI, the store's consent transactions) shapes its record here, so the
columns and their bounds are written once.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from . import urns

# The audit_event columns a record may carry (models.AuditEvent, without its id).
FIELDS = ("time", "event", "grant", "client_id", "issuer", "subject", "target", "source_patient", "target_patient",
          "scope_requested", "scope_granted", "outcome", "error", "jti", "consent", "link", "assertion_jti",
          "request_id", "reason", "user_link", "source_user", "target_user", "dpop_jkt")
ID_LENGTH, SCOPE_TEXT_LENGTH, REASON_LENGTH = 255, 2000, 1000


def clip(value, n: int = ID_LENGTH):
    """A string cut to n characters (the column's bound); anything else as it is."""
    return value[:n] if isinstance(value, str) else value


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- exchange decisions (the token pipeline and the grants) --------------------------------
def exchange(request_id: str | None) -> dict:
    """A decision's record as the token pipeline opens it: refused until a token exists."""
    return {"outcome": "refused", "request_id": request_id}


def refused(record: dict, error) -> None:
    """The refusal's code and its internal reason (the private detail, else the description)."""
    record["error"] = error.error
    record["reason"] = clip(getattr(error, "detail", None) or error.description, REASON_LENGTH)


# -- consent decisions and withdrawals -------------------------------------------------------
def consent_decision(ticket, granted: bool, consent_id: str, target_url: str, request_id: str | None) -> dict:
    """The user's answer on the consent page (granted, or a denial), from the ticket's row."""
    return {"time": now(), "event": "consent-granted" if granted else "consent-denied", "grant": None,
            "client_id": ticket.client_id, "issuer": ticket.issuer, "subject": ticket.sub, "target": target_url,
            "source_patient": ticket.patient or None, "scope_granted": ticket.scopes,
            "outcome": "granted" if granted else "refused", "consent": consent_id,
            "reason": None if granted else "denied by the user", "request_id": request_id}


def withdrawal(reason: str, request_id: str | None = None) -> dict:
    """A withdrawal as its writer knows it before the consent's row is read (the user at
    /consent, an admin); ``withdrawn`` completes it from the row."""
    return {"time": now(), "event": "consent-withdrawn", "grant": None, "reason": reason, "request_id": request_id}


def withdrawn(base: dict, consent_id: str, scopes: str, **row_fields) -> dict:
    """The withdrawal record of one consent: ``base`` (a withdrawal, or the granting
    decision that replaces it) with the consent's own fields."""
    return dict(base, event="consent-withdrawn", consent=consent_id, scope_granted=scopes, outcome="granted",
                **row_fields)


# -- revocations -------------------------------------------------------------------------------
def revocation(request_id: str | None) -> dict:
    """POST /revoke's record (RFC 7009) as the endpoint opens it: refused until the
    client is known and its token revoked (``revoked``)."""
    return {"event": "revoke", "grant": None, "outcome": "refused", "request_id": request_id}


def revoked(record: dict, client_id: str) -> None:
    """The client revoked its token (the record names the token's jti, when it was one of ours)."""
    record.update(client_id=client_id, outcome="granted")


def token_revoke(actor: str, kind: str, fields: dict, time: datetime, covered: int) -> dict:
    """`token revoke`'s record: what the rule names (``fields``: client_id, issuer,
    target, source, patient, fhir_user, jti), when, by whom, and how many audited
    grants it covers. The source FHIR base and the user's URL go in the reason (the
    record has no column of its own for them)."""
    names = {k: v for k, v in fields.items() if v is not None}
    return {"time": time, "event": "token-revoke", "grant": None, "client_id": clip(fields.get("client_id")),
            "issuer": fields.get("issuer"), "target": fields.get("target"),
            "source_patient": clip(fields.get("patient")), "jti": fields.get("jti"), "outcome": "granted",
            "reason": clip(f"by {actor}: {kind} " + " ".join(f"{k}={v}" for k, v in names.items())
                           + f"; covers {covered} audited grant(s) issued before {time.isoformat()}", REASON_LENGTH)}


# -- admin events ------------------------------------------------------------------------------
def admin(actor: str, action: str, detail: str, time: datetime | None = None) -> dict:
    """An admin_event row: who (an admin, or the service itself), what, on what."""
    return {"time": time or now(), "actor": actor, "action": action, "detail": detail}

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
    if e.get("source_user"):  # the user as the source knows them, and as the target does (a mapped target)
        entities.append(_user(e["source_user"], "source user"))
    if e.get("target_user"):
        mapped = f" (mapped by {e['user_link']})" if e.get("user_link") else ""
        entities.append(_user(f"{(e.get('target') or 'urn:unknown').rstrip('/')}/{e['target_user']}",
                              "target user" + mapped))
    detail = [{"type": k, "valueString": e[k]} for k in ("scope_requested", "scope_granted", "target") if e.get(k)]
    if e.get("link"):  # how the patient was mapped: table, matched, matched-stored, none, ambiguous, unavailable
        detail.append({"type": "patient-mapping", "valueString": e["link"]})
    if e.get("user_link"):  # how the user was mapped: table, matched, patient, none, blocked, ...
        detail.append({"type": "user-mapping", "valueString": e["user_link"]})
    if e.get("dpop_jkt"):  # the token is bound to this key (RFC 9449 cnf.jkt)
        detail.append({"type": "dpop-jkt", "valueString": e["dpop_jkt"]})
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


def _user(url, description):
    """A user as an entity: a reference to their FHIR resource (Practitioner, RelatedPerson, ...)."""
    return {"what": {"reference": url},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJ_ROLE, "code": "6", "display": "User"},
            "description": description}


def fhir_bundle(events, service: str) -> dict:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": audit_event(e, service)} for e in events]}
