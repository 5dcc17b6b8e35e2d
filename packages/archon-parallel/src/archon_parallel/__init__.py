"""archon-parallel."""
