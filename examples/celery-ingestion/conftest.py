"""Makes the client package from this checkout and the test process helpers importable
when pytest is run by hand."""

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
for path in (REPOSITORY / "clients/python/src", REPOSITORY / "tests/python", Path(__file__).parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
