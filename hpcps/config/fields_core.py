"""Config keys of the run, data, model, training loop, checkpoints, GPU and the synthetic
workload."""

from hpcps.config.fields import field, section

# -- top level -------------------------------------------------------------------------
section("", "Run-wide settings.")
field("out_dir", "str", "out", "Run directory: metrics.jsonl, config.toml, checkpoints/.")
field("workload", "str", "gpt", "What to train.",
      choices=("gpt", "bert", "seq2seq", "skipgram", "rnn", "synthetic"))
field("device", "str", "cpu", "Array backend: cpu (NumPy) or gpu (CuPy, one GPU per worker).",
      choices=("cpu", "gpu"))

# -- data ------------------------------------------------------------------------------
section("data", "The prepared HDF5 corpus (see docs/corpus-format.md).")
field("data.path", "str", "", "Path of the corpus written by `hpcps prepare`.")
field("data.in_memory_mb", "int", 1024,
      "Load a split into RAM when it is at most this many MB; larger splits are read from HDF5.",
      min=0)

# -- model -----------------------------------------------------------------------------
section("model", "Transformer shape (gpt, bert, seq2seq).")
field("model.n_layer", "int", 4, "Transformer blocks.", min=1)
field("model.n_head", "int", 4, "Attention heads; must divide n_embd.", min=1)
field("model.n_embd", "int", 128, "Embedding / residual width.", min=1)
field("model.block_size", "int", 64, "Context length in tokens.", min=1)
field("model.bias", "bool", False, "Biases in Linear and LayerNorm layers.")
field("model.dropout", "float", 0.0, "Dropout probability.", min=0.0, max=0.99)
field("model.tie_embeddings", "bool", True,
      "Share the token embedding with the LM head (GPT-2 style).")

# -- train -----------------------------------------------------------------------------
section("train", "Optimisation and the training loop.")
field("train.batch_size", "int", 12, "Sequences per worker per step (global batch = workers x this).",
      min=1)
field("train.max_steps", "int", 2000, "Optimizer steps to run.", min=1)
field("train.optimizer", "str", "adamw", "Optimizer run on the server shards.",
      choices=("adamw", "sgd"))
field("train.lr", "float", 1e-3, "Peak learning rate.", min=0.0, min_exclusive=True)
field("train.min_lr", "float", 1e-4, "Learning rate at the end of the cosine decay.", min=0.0)
field("train.warmup_steps", "int", 100, "Linear warm-up steps.", min=0)
field("train.lr_decay_steps", "int", 0,
      "Cosine decay length in steps (0: max_steps).", min=0)
field("train.weight_decay", "float", 0.1, "Decoupled weight decay (2-D weights only).", min=0.0)
field("train.beta1", "float", 0.9, "AdamW beta1.", min=0.0, max=0.999999)
field("train.beta2", "float", 0.99, "AdamW beta2.", min=0.0, max=0.999999)
field("train.eps", "float", 1e-8, "AdamW epsilon.", min=0.0, min_exclusive=True)
field("train.momentum", "float", 0.9, "SGD momentum.", min=0.0, max=0.999999)
field("train.grad_clip", "float", 1.0, "Global-norm gradient clipping (0: off).", min=0.0)
field("train.seed", "int", 1337, "Seed for init, data order and dropout.", min=0)
field("train.eval_every", "int", 250, "Evaluate on val every N steps (0: only at the end).", min=0)
field("train.eval_steps", "int", 20, "Batches per evaluation.", min=1)
field("train.log_every", "int", 10, "Print progress every N steps.", min=1)
field("train.tensorboard", "bool", False,
      "Also write the per-step metrics as TensorBoard events to OUT_DIR/tensorboard "
      "(needs tensorboardX: pip install 'hpcps[tensorboard]').")
field("train.resume", "str", "auto",
      "auto: newest committed checkpoint in checkpoint.dir; never; or a checkpoint path.")
field("train.init_from", "str", "",
      "Start from the weights of this checkpoint or run directory (e.g. one `hpcps import` wrote) "
      "with a fresh optimizer and schedule at step 0; the model shape comes from it, and its "
      "corpus must have the same tokenizer. A run that resumes from its own checkpoint ignores it.")
field("train.peak_flops", "float", 0.0,
      "Peak FLOP/s per worker for MFU (0: measured with a matmul at start-up).", min=0.0)
field("train.recompute", "str", "none",
      "Activation recomputation (gpt, bert, seq2seq): none keeps every activation; attention "
      "recomputes the attention probabilities in the backward; block keeps only each block's "
      "input and runs its forward again (same gradients, bit for bit; less memory, more compute).",
      choices=("none", "attention", "block"))
field("train.memory_check", "bool", True,
      "Estimate every rank's memory before allocating and stop (exit 2) when a node's ranks "
      "would not fit in its available memory (cgroup limit included).")

# -- checkpoint ------------------------------------------------------------------------
section("checkpoint", "HDF5 checkpoint shards (see docs/checkpoint-format.md).")
field("checkpoint.dir", "str", "", "Checkpoint directory (empty: OUT_DIR/checkpoints).")
field("checkpoint.every", "int", 0, "Checkpoint every N steps (0: only at the end and on signals).",
      min=0)
field("checkpoint.keep", "int", 3, "Committed checkpoints to keep.", min=1)
field("checkpoint.background", "bool", True,
      "Snapshot to host memory and write in a background thread while training continues.")

# -- gpu -------------------------------------------------------------------------------
section("gpu", "GPU settings (device = gpu).")
field("gpu.compute_dtype", "str", "fp32", "Matmul precision on the GPU; master weights stay fp32.",
      choices=("fp32", "tf32", "bf16"))
field("gpu.share", "bool", False, "Allow more workers than GPUs on a node (they share devices).")

# -- synthetic -------------------------------------------------------------------------
section("synthetic", "A model-free workload with exact integer gradients (protocol tests, PS benchmarks).")
field("synthetic.n_params", "int", 1_000_000, "Elements in the flat buffer.", min=1)
field("synthetic.compute_ms", "float", 0.0, "Sleep per step, standing in for forward/backward.",
      min=0.0)
