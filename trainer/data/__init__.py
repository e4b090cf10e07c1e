"""The data path: tokenizers, corpus readers (text, JSONL, Parquet, prepared token shards,
Megatron indexed datasets), ``yoto data prepare`` and the sampler over them."""
