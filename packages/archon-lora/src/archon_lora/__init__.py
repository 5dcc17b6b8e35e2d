"""archon-lora."""
