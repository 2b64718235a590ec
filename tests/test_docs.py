"""The docs stand on their own (issue 25, item 13): they cite no document outside the
repository, and `explain` numbers the rules as docs/REFERENCE.md does."""
from __future__ import annotations

import json
import re
from pathlib import Path

from fakes import TARGET

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_no_doc_cites_a_contract_outside_the_repository():
    cited = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in DOCS
             for n, line in enumerate(p.read_text().splitlines(), start=1)
             if re.search(r"\bthe contract\b|contract's|CONTRACT\.md|contract rule", line, re.I)]
    assert cited == []


def reference_rules() -> tuple[dict, list[str]]:
    """REFERENCE.md's numbered rules (number -> text) and its check-order bullets."""
    text = (ROOT / "docs" / "REFERENCE.md").read_text()
    rules_part = re.search(r"^### The rules\n(.*?)^### ", text, re.S | re.M).group(1)
    rules = {int(n): body for n, body in re.findall(r"^(\d)\. (.*?)(?=^\d\. |\Z)", rules_part, re.S | re.M)}
    checks_part = re.search(r"^### The checks, in order.*?\n(.*?)^Other answers", text, re.S | re.M).group(1)
    bullets = [b.replace("\n", " ") for b in re.findall(r"^- (.*?)(?=^- |\Z)", checks_part, re.S | re.M)]
    return rules, bullets


def numbers(text: str) -> set[int]:
    m = re.search(r"rules? ([\d, and]+)", text)
    return {int(n) for n in re.findall(r"\d", m.group(1))} if m else set()


def test_explain_names_the_rules_as_reference_numbers_them(world, ehr, tmp_path):
    (tmp_path / "at").write_text(ehr.access_token())
    (tmp_path / "idt").write_text(ehr.id_token())
    r = world("explain", "--client", "vendor", "--subject-token", str(tmp_path / "at"), "--actor-token",
              str(tmp_path / "idt"), "--resource", TARGET, "--json")
    steps = [s["step"] for s in json.loads(r.stdout)["steps"]]
    rules, bullets = reference_rules()
    assert sorted(rules) == list(range(1, 8))
    named = [s for s in steps if numbers(s)]
    assert sorted(n for s in named for n in numbers(s)) == [1, 2, 3, 4, 5, 6, 7]
    for step in named:
        what = step.split(" (")[0].split()[0].rstrip("s")  # tokens, trust, upstream, scopes, patient
        (bullet,) = [b for b in bullets if numbers(b) == numbers(step)]
        assert what.lower() in bullet.lower(), (step, bullet)
    # The rules' words agree too: rule 3 is the upstream client, 5 the trust, 6 scopes, 7 the patient.
    assert "upstream client" in rules[3] and "trust exists" in rules[5]
    assert rules[6].startswith("Scopes") and rules[7].startswith("Patient")
