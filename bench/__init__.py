"""The token-exchange benchmark (see bench/README.md). `python bench/run.py` is the entry point.

- common.py    paths, the exchange's constants, the variants, log()
- workload.py  signed request bodies (token pairs from tests/fakes.py's FakeEHR), the crypto-only ceiling
- world.py     the service's database, set up through the CLI; the fake FHIR target of the match variant
- load.py      process control: gunicorn start/stop, wrk runs, CPU and RSS sampling
- measure.py   measured runs: rounds of floor, service and variants, re-run when disturbed
- report.py    the machine, the summaries, the end-of-run checks, RESULTS.md and the console summary
- inprocess.py where the time goes, in one process (a separate diagnostic)
"""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)  # tests/fakes.py: the one fake EHR, shared with the tests
