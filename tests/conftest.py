"""Shared test settings: hypothesis profiles (``HYPOTHESIS_PROFILE=stress`` explores far more cases)."""

import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.filter_too_much]
settings.register_profile("default", max_examples=200, deadline=None, derandomize=True, suppress_health_check=_QUIET)
settings.register_profile("stress", max_examples=5000, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
