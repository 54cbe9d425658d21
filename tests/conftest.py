import os

from hypothesis import HealthCheck, settings

# CI-sized by default; MLC_HYPOTHESIS_PROFILE=thorough runs ten times as many examples.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("MLC_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """Keep the compile cache of a test run in a temporary directory."""
    import tempfile
    os.environ.setdefault("MLC_CACHE_DIR", tempfile.mkdtemp(prefix="mlc-cache-"))
