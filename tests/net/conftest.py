"""The end-to-end net tests use the integration tests' state directory (logs printed on failure)."""

from tests.integration.conftest import pytest_runtest_makereport, state_dir

__all__ = ["pytest_runtest_makereport", "state_dir"]
