"""ONNX -> ONNX rewrites, one pass per file; each takes a graph and returns a new one with a report.

- `precision`: the precision pass (fp32 / fp16 / hybrid / auto) into a strongly typed graph.
- `auto_precision`: which nodes `auto` keeps in FP32, measured.
- `qdq`: explicit INT8 Q/DQ placement on MatMul/Gemm inputs (`QdqPlacer`, `insert_qdq`).
- `smoothquant`: SmoothQuant, activation outliers moved into the weights (`smooth`).
- `vocab_prune`: vocabulary pruning, the word-embedding table cut to the kept ids behind an
  int32 id remap (`prune_vocabulary`).
"""
