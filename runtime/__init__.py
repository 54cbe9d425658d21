"""Runtime: executables, artifacts, caches — arrives with the CPU backend issue."""
