"""SMART scopes in plain words for the approval page: "read your observations",
"read and write your appointments"."""
from __future__ import annotations

import re

from .. import scopes

# FHIR resource types people meet, in the words they would use; others are spelled
# out from the type's name ("MedicationRequest" -> "medication requests").
_NOUNS = {
    "*": "health records", "AllergyIntolerance": "allergies", "Appointment": "appointments",
    "CarePlan": "care plans", "CareTeam": "care teams", "Condition": "conditions and problems",
    "Coverage": "insurance coverage", "Device": "devices", "DiagnosticReport": "test reports",
    "DocumentReference": "documents", "Encounter": "visits", "Goal": "goals", "Immunization": "immunizations",
    "Location": "locations", "Medication": "medications", "MedicationRequest": "prescriptions",
    "MedicationStatement": "medication lists", "Observation": "observations", "Organization": "organizations",
    "Patient": "patient details", "Practitioner": "clinicians", "PractitionerRole": "clinicians' roles",
    "Procedure": "procedures", "Provenance": "record history", "Questionnaire": "questionnaires",
    "QuestionnaireResponse": "questionnaire answers", "RelatedPerson": "related people",
    "ServiceRequest": "orders and referrals",
}
_WORDS = {"c": "create", "u": "update", "d": "delete"}


def noun(resource: str) -> str:
    if resource in _NOUNS:
        return _NOUNS[resource]
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", resource).lower()
    return words if words.endswith("s") else words + "s"


def verb(perms) -> str:
    parts = []
    if perms & {"r", "s"}:
        parts.append("read" if "r" in perms else "search")
    writes = [w for c, w in _WORDS.items() if c in perms]
    if len(writes) == 3:
        parts.append("write")
    elif writes:
        parts += writes
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)


def phrase(scope) -> str:
    """One scope -> a sentence fragment, from the signer's point of view."""
    what = noun(scope.resource)
    if scope.context == "patient":
        text = f"{verb(scope.perms)} your {what}"
    elif scope.context == "user":
        text = f"{verb(scope.perms)} the {what} your account can see"
    else:
        text = f"{verb(scope.perms)} all {what}"
    if scope.params:
        cond = ", ".join(p.replace("=", " ", 1) for p in scope.params.split("&"))
        text += f" (only {cond})"
    return text


def describe(scope_text: str) -> list[str]:
    return [phrase(s) for s in scopes.parse(scope_text, strict=False).scopes]
