"""Hypothesis profiles for the property tests (tests/test_sim_properties.py).

`make test` runs each property test with the example count written in the test. The
`fuzz` profile (`make fuzz`, or `HYPOTHESIS_PROFILE=fuzz` / `--hypothesis-profile=fuzz`)
runs every property test of `tests/test_sim_properties.py` with the profile's
`max_examples` instead: 5,000 each, over 10,000 random scenarios in all, unseeded (new
scenarios each run), no deadline. Hypothesis' example database keeps any failure found and
replays it first on the next run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES_PER_TEST = 5000

settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES_PER_TEST,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
