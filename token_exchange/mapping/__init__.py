"""Who is who at the target: the patient (``patients``) and the signed-in user
(``users``), side by side, sharing one exactly-one search (``search``)."""
