"""archon-attn."""
