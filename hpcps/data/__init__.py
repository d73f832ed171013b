"""Token corpora: tokenizers, the HDF5 corpus format, ``prepare`` and the reader.

Import the submodules directly (``hpcps.data.corpus.Corpus``,
``hpcps.data.tokenizer.Tokenizer``, ``hpcps.data.prepare.prepare``); this
package imports nothing heavy so ``hpcps --help`` stays fast.
"""
