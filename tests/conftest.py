"""Suite-wide settings.

On CI, hypothesis draws the same examples every run (derandomize): a property test that
finds a new counterexample should do so on a developer's run and become a fix and an
`@example`, not turn a submission red at random.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
