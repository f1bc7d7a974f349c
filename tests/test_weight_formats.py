"""Our backends through the weight-format conformance cases (see opswitch/testing)."""

from opswitch.testing.test_weight_formats import (  # noqa: F401  (collected by pytest)
    test_linear_with_stored_weight,
    test_tied_head_and_embedding_with_stored_table,
)
