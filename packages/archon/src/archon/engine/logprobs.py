"""Re-export: the logprob math lives beside the LM head in `archon.models.common.logprobs`."""

from archon.models.common.logprobs import head_logprobs, next_token_labels, shift_to_tokens

__all__ = ["head_logprobs", "next_token_labels", "shift_to_tokens"]
