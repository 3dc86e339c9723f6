"""Helpers for the TIGER tests and bench/tiger.py: random semantic IDs, exhaustive scoring (the
reference constrained beam search must reproduce), and Hugging Face T5 interop (the same architecture as
a transformers.T5Config, our weights under T5ForConditionalGeneration's parameter names) for the parity
test and the speed comparison. Kept out of tiger.py, which needs none of them."""
import numpy as np
import torch

from tiger import EOS, PAD, SemanticIDs, Tiger, TigerConfig, decoder_inputs, semantic_ids


def random_semantic_ids(n_items: int, vocab_sizes=(256, 256, 256), seed: int = 0) -> tuple[np.ndarray, list]:
    """Random unique semantic IDs: uniform codes per level, then tiger.semantic_ids' dedup level.
    Returns codes (n_items, len(vocab_sizes) + 1) int64 and the vocab sizes per level, the dedup
    level's = the largest collision group (kept small, unlike semantic_ids' >= codebook_size)."""
    rng = np.random.default_rng(seed)
    head = np.stack([rng.integers(0, v, n_items) for v in vocab_sizes], axis=1)   # (N, L)
    codes, _ = semantic_ids(head, codebook_size=max(vocab_sizes))           # (N, L + 1)
    return codes, [int(v) for v in vocab_sizes] + [int(codes[:, -1].max()) + 1]


def exhaustive_scores(model: Tiger, src, ids: SemanticIDs, chunk: int = 4096) -> torch.Tensor:
    """Log-probability of every catalog item's ID for each encoder input: (B, T) -> (B, N) float32,
    teacher-forced (the reference that constrained beam search must reproduce). Eval mode, restored."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            kvs, mem_mask = model.encode_memory(src)
            B = mem_mask.shape[0]
            out = []
            for s in range(0, ids.n_items, chunk):
                tgt = ids.tokens[s:s + chunk]                                  # (n, S)
                n, S = tgt.shape
                tin = decoder_inputs(tgt).repeat(B, 1)                         # (B*n, S): n per user
                logits = model.decoder(tin, kvs, mem_mask)[0].float()          # (B*n, S, V)
                lp = torch.log_softmax(logits, -1).gather(-1, tgt.repeat(B, 1).unsqueeze(-1))  # (B*n, S, 1)
                out.append(lp.view(B, n, S).sum(-1))                           # (B*n, S, 1) -> (B, n)
            return torch.cat(out, dim=1)
    finally:
        model.train(was)


def t5_config_kwargs(cfg: TigerConfig) -> dict:
    """Keyword arguments of transformers.T5Config for the same architecture."""
    return {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
            "num_layers": cfg.n_encoder_layers, "num_decoder_layers": cfg.n_decoder_layers,
            "num_heads": cfg.n_heads, "relative_attention_num_buckets": cfg.rel_buckets,
            "relative_attention_max_distance": cfg.rel_max_distance, "dropout_rate": cfg.dropout,
            "layer_norm_epsilon": cfg.eps, "feed_forward_proj": "relu", "tie_word_embeddings": True,
            "pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": PAD}


def t5_state_dict(model: Tiger) -> dict:
    """Our weights under Hugging Face T5ForConditionalGeneration's parameter names."""
    inner = model.cfg.n_heads * model.cfg.d_kv
    emb = model.shared.weight
    sd = {"shared.weight": emb, "encoder.embed_tokens.weight": emb, "decoder.embed_tokens.weight": emb,
          "lm_head.weight": emb}
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        sd[f"{side}.final_layer_norm.weight"] = stack.norm.weight
        sd[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = stack.bias.emb.weight
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, layer in enumerate(stack.layers):
            p = f"{side}.block.{i}.layer"
            q, k, v = layer.attn.qkv.weight.split(inner)
            sd.update({f"{p}.0.SelfAttention.q.weight": q, f"{p}.0.SelfAttention.k.weight": k,
                       f"{p}.0.SelfAttention.v.weight": v,
                       f"{p}.0.SelfAttention.o.weight": layer.attn.o.weight,
                       f"{p}.0.layer_norm.weight": layer.norm1.weight})
            f = 1
            if side == "decoder":
                ck, cv = layer.cross.kv.weight.split(inner)
                sd.update({f"{p}.1.EncDecAttention.q.weight": layer.cross.q.weight,
                           f"{p}.1.EncDecAttention.k.weight": ck, f"{p}.1.EncDecAttention.v.weight": cv,
                           f"{p}.1.EncDecAttention.o.weight": layer.cross.o.weight,
                           f"{p}.1.layer_norm.weight": layer.norm2.weight})
                f = 2
            norm_ff = layer.norm2 if side == "encoder" else layer.norm3
            sd.update({f"{p}.{f}.DenseReluDense.wi.weight": layer.ff.wi.weight,
                       f"{p}.{f}.DenseReluDense.wo.weight": layer.ff.wo.weight,
                       f"{p}.{f}.layer_norm.weight": norm_ff.weight})
    return {k: v.detach().clone() for k, v in sd.items()}
