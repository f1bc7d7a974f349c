"""Our backends through the same conformance suite a plugin author runs.

Parametrized over every available backend (and naive in float64), so a new
backend is covered the day it is registered.
"""

from opswitch.testing.test_conformance import (  # noqa: F401  (collected by pytest)
    test_attention_cache_grows_consistently,
    test_op_matches_reference,
    test_reusing_an_old_cache_does_not_corrupt_the_new_one,
)
