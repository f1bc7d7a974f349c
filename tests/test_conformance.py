"""Our backends through the same conformance suite a plugin author runs.

Parametrized over every available backend (and naive/blas in float64), so a
new backend is covered the day it is registered.
"""

from opswitch.testing.test_conformance import (  # noqa: F401  (collected by pytest)
    test_a_batch_equals_each_sequence_alone,
    test_an_f16_kv_cache_holds_rounded_values_and_attends_within_their_bound,
    test_an_f16_kv_cache_passes_nan_on,
    test_decoding_through_the_cache_equals_attending_at_once,
    test_op_matches_reference,
)
