"""archon-moe."""
