"""Repository-wide pytest setup: pytester for the tests that run pytest itself."""

pytest_plugins = ["pytester"]
