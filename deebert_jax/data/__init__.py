"""GLUE TSVs and the datasets hub -> token arrays and batches; model inputs checked at the edges."""
