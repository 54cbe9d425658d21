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
    os.environ.setdefault("MLC_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="mlc-key-"), "key"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (whole training runs of the examples, large models) run only with MLC_RUN_SLOW=1; tests
    marked `cuda` only where pycuda finds a GPU."""
    import pytest
    slow = pytest.mark.skip(reason="slow (a full training run or a large model): set MLC_RUN_SLOW=1")
    no_gpu = gpu_missing()
    for item in items:
        if item.get_closest_marker("slow") and os.environ.get("MLC_RUN_SLOW") != "1":
            item.add_marker(slow)
        if item.get_closest_marker("cuda") and no_gpu:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {no_gpu}"))


def gpu_missing() -> str | None:
    """Why the tests cannot run on a GPU here, or None when they can."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return "pycuda is not installed (the cuda extra)"
    try:
        cuda.init()
        return None if cuda.Device.count() else "no CUDA device"
    except cuda.Error as e:
        return f"no CUDA driver ({e})"
