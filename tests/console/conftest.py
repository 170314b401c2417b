"""Fixtures of the console tests: the integration tests' short state directory (its
logs are printed when a test fails) and the in-process VOP rig."""

from __future__ import annotations

from tests.integration.conftest import pytest_runtest_makereport, state_dir
from tests.vop.conftest import rig

__all__ = ["pytest_runtest_makereport", "rig", "state_dir"]
