"""kimi-jax: Kimi K2 (DeepSeek-V3-shaped MoE) in JAX / Flax NNX, with the MuonClip optimizer.

Conventions for the whole package. Module headers may add letters of their own (tiles, matrix sides, receive rows),
never give one of these another meaning.

Dimension letters, as shapes are written in docstrings and comments ([B, S, D]):
  B    batch (sequences)
  S    query positions: the sequence in training and prefill, the new tokens in decode
  T    key positions: the sequence in training, the allocated cache length in decode
  N    tokens of a flattened batch (N = B·S);  P  (token, expert) pairs (P = N·K)
  D    model width (hidden_size);  V  vocabulary;  L  stacked layers of one group;  H  attention heads
  Cq   q latent rank (q_lora_rank);  C  kv latent rank (kv_lora_rank)
  Dn / Dr / Dv   per-head nope / rope / value dims (qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
  E    routed experts;  K  experts per token;  F  dense-MLP hidden (intermediate_size);  Fe  expert hidden
       (moe_intermediate_size)
  X'   (primed) the per-device share of X inside a `shard_map` body, e.g. N' tokens, E' local experts

Mesh axes (kimi_jax/sharding.py, which alone maps the model's logical axis names onto them):
  data    pure data parallel, the outer (DCN) axis across slices
  fsdp    data parallel with parameters and optimizer state sharded over it
  expert  routed experts split over it (data parallel for everything else)
  tensor  heads and MLP hidden units split over it

Dtypes: `param_dtype` for stored weights, `dtype` for compute; router scores, softmax, expert combine, losses and
optimizer state are float32 whatever those are (kimi_jax/config.py).

Implementation choices (`auto` → the kernel or XLA path per platform being compiled for) are made in one place,
kimi_jax/backend.py. The path of a batch from the data pipeline to the optimizer, and of a prompt to its tokens, is
docs/architecture.md.
"""
