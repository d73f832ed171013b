"""Config keys of the BERT-style MLM and seq2seq (T5-style) workloads.

Both models take their shape from the shared ``[model]`` keys (n_layer, n_head,
n_embd, bias, dropout; block_size is the MLM sequence length). What is specific to
each lives here.
"""

from hpcps.config.fields import field, section

# -- bert ------------------------------------------------------------------------------
section("bert", "BERT-style masked language model (workload = bert).")
field("bert.mask_prob", "float", 0.15,
      "Fraction of each sequence's positions that are predicted (at least one per sequence).",
      min=0.0, max=1.0, min_exclusive=True)
field("bert.mask_token_prob", "float", 0.8,
      "Of the predicted positions, the share whose input becomes [MASK].", min=0.0, max=1.0)
field("bert.random_token_prob", "float", 0.1,
      "Of the predicted positions, the share whose input becomes a random token "
      "(the rest keep their token; mask_token_prob + random_token_prob <= 1).",
      min=0.0, max=1.0)

# -- seq2seq ---------------------------------------------------------------------------
section("seq2seq", "Encoder-decoder translator on a parallel corpus (workload = seq2seq).")
field("seq2seq.max_src_len", "int", 64,
      "Source positions including EOS; longer sources are truncated.", min=2)
field("seq2seq.max_tgt_len", "int", 64,
      "Target positions including BOS / EOS; longer targets are truncated.", min=2)
field("seq2seq.n_dec_layer", "int", 0, "Decoder blocks (0: model.n_layer).", min=0)
field("seq2seq.beam", "int", 4, "Beam width for evaluation decoding (1: greedy).", min=1)
field("seq2seq.length_penalty", "float", 0.6,
      "Beam search length penalty alpha: scores divided by ((5 + len) / 6)^alpha (0: none).",
      min=0.0)
field("seq2seq.eval_pairs", "int", 64,
      "Val pairs decoded per evaluation for val_bleu (decoding is the expensive part).", min=0)
field("seq2seq.label_smoothing", "float", 0.0,
      "Training target (1 - eps) on the reference token + eps spread over the vocabulary "
      "(0: plain cross-entropy; val_loss is always the plain one).", min=0.0, max=0.99)
field("seq2seq.share_embeddings", "bool", False,
      "One token table for encoder and decoder (and the output layer when "
      "model.tie_embeddings): needs a corpus with one tokenizer for both sides "
      "(`hpcps prepare --parallel ... --joint-vocab`).")
field("seq2seq.length_buckets", "int", 0,
      "Sort the train pairs by length into N buckets and draw each step from one bucket, "
      "so batches pad little (0 or 1: draw from all pairs).", min=0)
