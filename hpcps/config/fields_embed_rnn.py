"""Config keys of the skip-gram and RNN-classifier workloads."""

from hpcps.config.fields import field, section

# -- skip-gram ----------------------------------------------------------------------------
section("skipgram", "Skip-gram with negative sampling (word2vec) on any prepared LM corpus.")
field("skipgram.dim", "int", 128, "Embedding width of both tables (emb_in, emb_out).", min=1)
field("skipgram.window", "int", 5,
      "Largest distance between center and context token (each pair draws a window in 1..this).",
      min=1)
field("skipgram.negatives", "int", 5, "Negative samples per (center, context) pair.", min=1)
field("skipgram.neg_power", "float", 0.75,
      "Negatives are drawn from unigram counts raised to this power.", min=0.0)
field("skipgram.subsample", "float", 1e-3,
      "Frequent-token subsampling threshold t (word2vec's -sample; 0: keep every token).",
      min=0.0, max=1.0)

# -- RNN classifier -----------------------------------------------------------------------
section("rnn", "Recurrent text classifier (embedding, LSTM or GRU, pooling, linear) on a "
               "classification corpus.")
field("rnn.cell", "str", "lstm", "Recurrent cell.", choices=("lstm", "gru"))
field("rnn.embed_dim", "int", 64, "Token embedding width.", min=1)
field("rnn.hidden_size", "int", 128, "Recurrent state width.", min=1)
field("rnn.max_len", "int", 128, "Tokens kept per string (longer strings keep their first ones).",
      min=1)
field("rnn.bptt", "int", 0,
      "Truncated backprop through time: gradients flow back at most this many steps from the "
      "end of each string, in blocks (0: full backprop).", min=0)
field("rnn.pool", "str", "last", "Sequence summary fed to the classifier: last state or mean "
      "over the string's positions.", choices=("last", "mean"))
