"""One line per config key, shown by ``fractalformer config --list`` (a test keeps it complete)."""

from __future__ import annotations

KEY_HELP: dict[str, str] = {
    # model
    "family": "model family: gpt dense, fractal block-nested, matformer prefix-nested, mrl nested head, "
              "moe sparse experts, concept next-concept levels above the tokens",
    "levels": "nesting depth; level l holds split**l sub-models",
    "split": "children per sub-model at each level",
    "attn_nesting": "how attention nests: head_dim narrows every head, heads gives blocks of whole heads",
    "residual": "fractal only: cross-level residuals after every layer",
    "residual_rank": "0 adds residual states directly; r > 0 through a learned rank-r map",
    "glue_rank": "fractal merge glue: rank-r maps between the level-1 blocks of every linear (0: none; "
                 "folded into the weights after glue training)",
    "level_weights": "loss weight per level (a list, or comma-separated with --set); empty: every "
                     "sub-model alike",
    "distill": "nested sub-models' loss: (1 - distill) * cross-entropy + distill * KL(full || sub)",
    "vocab_size": "tokens in the vocabulary (set from the tokenizer unless given)",
    "block_size": "context length in tokens",
    "token_window": "token-level attention reads only the last token_window tokens, a sliding window "
                    "(0: the whole block_size); family concept's levels still read the whole block_size, "
                    "so the model reaches past the window at about the window's cost",
    "n_layer": "transformer layers",
    "d_model": "width of the residual stream",
    "n_head": "query heads",
    "n_kv_head": "key/value heads: 1 multi-query, n_head multi-head, between grouped-query",
    "head_dim": "width of one attention head",
    "mlp_mult": "GeGLU inner width as a multiple of d_model",
    "mlp_bias": "biases in the MLP",
    "rope_theta": "rotary embedding base",
    "norm_eps": "RMSNorm epsilon",
    "dropout": "dropout probability",
    "init_std": "standard deviation of the initial weights",
    "moe": "family moe: the sparse layer (peer single-neuron experts, pkm value memory, fhme fractal "
           "experts)",
    "moe_layers": "layers that get the sparse layer: all, or comma-separated indices",
    "moe_with_mlp": "keep the dense MLP beside the sparse layer (outputs added)",
    "n_experts": "experts or memory slots N, a perfect square",
    "moe_heads": "retrieval heads",
    "moe_topk": "experts per head (at most sqrt(n_experts))",
    "moe_key_dim": "query / product-key width",
    "moe_gate": "routing weights from the scores",
    "moe_query_norm": "per-token query normalisation",
    "moe_sparse": "row-sparse table gradients trained by SparseAdam",
    "fhme_depth": "sub-blocks per fractal expert",
    "fhme_adaptive": "learned per-token halting (false: always full depth)",
    "halt_penalty": "weight of the ponder cost",
    "concept_levels": "family concept: causal concept levels above the tokens (level k groups combo "
                      "units of level k-1)",
    "combo": "family concept: units per concept, one number for every level or one per level (\"4,4\")",
    "combiner": "family concept: a concept is RMSNorm of its units' sum, or of a linear map of their "
                "concatenation",
    "concept_read": "family concept: a level reads the plans of the level above by cross-attention or "
                    "by adding the current plan",
    "concept_share": "family concept: one stack of blocks for every level, plus a learned level embedding",
    "concept_layers": "family concept: blocks per concept level (0: n_layer; shared: the first ones)",
    "concept_loss": "family concept: next-concept regression loss",
    "concept_weight": "family concept: regression loss weight, one for every level or one per level",
    "concept_read_init": "family concept: initial value of read_scale, the gate on each level's read of the "
                         "level above (0: the model starts as the dense GPT and trains stably under a short "
                         "warmup; 1 stalled on the unigram plateau)",
    # train
    "tokenizer": "tokenizer: bpe128 (the seed's), char (the text's characters), byte, bpe:N (a byte-level "
                 "BPE of N tokens trained on the training split) or gpt2 (tiktoken)",
    "data": "UTF-8 text file or a `fractalformer prepare` folder to train on (unset: the shipped "
            "TinyShakespeare); stored as an absolute path",
    "init_from": "fine-tuning: a run whose weights (and model config, tokenizer) training starts from",
    "on_unknown": "characters the tokenizer lacks: error, or replace them with '?'",
    "batch_size": "sequences per step (summed over torchrun processes)",
    "routing": "nested models: which rows each sub-model reads (shared, split, shard)",
    "data_shard": "J/N: train on contiguous shard J of N of the training tokens (empty: all of them)",
    "freeze": "none, or children: the level-1 sub-models' own entries stay fixed and only the glue "
              "between them trains (fractalformer merge)",
    "schedule_start": "step where warmup + cosine begin (a merged or grown run's new schedule)",
    "max_steps": "training steps: the cosine schedule's horizon",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warmup",
    "weight_decay": "AdamW weight decay of matrices",
    "table_lr": "peak learning rate of expert / memory tables (0: lr)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "global gradient-norm clip (0: none)",
    "eval_every": "steps between validation estimates",
    "eval_batches": "validation batches per estimate",
    "ckpt_every": "steps between checkpoints",
    "seed": "seed of the initial weights and of every step's batch",
    "device": "auto (CUDA when available), cpu or cuda",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU), float32 or bfloat16",
    "compile": "torch.compile the model (needs a C++ toolchain on CPU)",
    "threads": "CPU threads for this machine, divided among torchrun processes (0: OMP_NUM_THREADS, "
               "else every core)",
    "final_eval": "validation windows scored after training (and by eval): -1 as many as trained on "
                  "(max_steps x batch_size, at most the whole split), 0 none, N the first N",
    "grad_accum": "micro-batches per optimizer step (batch_size / grad_accum rows each): less memory, "
                  "the same gradient",
    "sync_every": "steps between reading the losses back to the host (a GPU runs ahead meanwhile); "
                  "also at every evaluation, checkpoint and the end",
    "parallel": "under torchrun: ddp (every process holds the whole model) or fsdp (parameters, "
                "gradients and optimizer state sharded with fully_shard)",
    "sample_tokens": "length of the sample printed after training (0: none)",
    "log": "csv (metrics.csv), or tensorboard: also TensorBoard scalars in RUN/tensorboard",
    "groups": "imposed token groups per width: empty none, seed, or a JSON file",
    "emergent_every": "re-cluster the embedding into groups every N steps (0: never)",
    "cluster_method": "clustering of the emergent groups",
    "cluster_eps": "cosine distance of the clustering (DBSCAN eps / agglomerative threshold)",
    "cluster_min_samples": "DBSCAN min_samples",
}
