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


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (whole training runs of the examples) run only with MLC_RUN_SLOW=1."""
    if os.environ.get("MLC_RUN_SLOW") == "1":
        return
    import pytest
    skip = pytest.mark.skip(reason="a full training run: set MLC_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
