"""Tiny random Hugging Face models used as independent references in tests and examples."""

import torch


def tiny_hf_config(model_type: str = "qwen3", **kw):
    """A tiny random HF config of the given family."""
    from transformers import AutoConfig

    base: dict[str, object] = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    if model_type in ("qwen3", "qwen3_moe"):
        base["head_dim"] = 24
    if model_type == "qwen3_moe":
        base.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[], norm_topk_prob=True)
    base.update(kw)
    cfg = AutoConfig.for_model(model_type, **base)
    cfg._attn_implementation = "eager"
    if model_type == "qwen3_moe":
        cfg._experts_implementation = "eager"
    return cfg


def hf_model(cfg, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms so a mixed-up norm weight cannot pass
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith("bias"):
                p.normal_(0, 0.05)
    return m.eval()


def hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """Exactly ``n`` greedy tokens after ``prompt`` from HF ``generate`` (no EOS): the reference for samplers."""
    import torch

    ids = torch.tensor([prompt])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def tiny_byte_tokenizer(out_dir: str, chat_template: str = "chatml") -> str:
    """A byte-level BPE tokenizer without merges (256 byte tokens + ChatML specials) saved to ``out_dir``:
    a real HF fast tokenizer whose vocabulary fits a tiny model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from archon.chat_templates import CHAT_TEMPLATES

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, normalized=False, special=t.startswith("<|"))
                    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=CHAT_TEMPLATES[chat_template])
    hf.save_pretrained(out_dir)
    return out_dir
