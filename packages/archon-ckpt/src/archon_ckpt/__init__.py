"""archon-ckpt."""
