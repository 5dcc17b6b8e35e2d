"""archon-rl."""
