import os

from hypothesis import HealthCheck, settings

# CI-sized by default; MLC_HYPOTHESIS_PROFILE=thorough runs ten times as many examples.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MLC_HYPOTHESIS_PROFILE", "ci"))
