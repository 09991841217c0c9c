"""Measuring a variant against the FP32 model.

- `fp16_reference`: the faithful FP16 reference (ONNX Runtime's CPU provider hides FP16 overflow).
- `fidelity`: the one fidelity probe (cosine, max error, non-finite; per output, per input set),
  used by verify, the `auto` and INT8 budgets, QAT's report and the benchmarks.
- `verify`: the verify stage (real text and random ids).
- `task_accuracy`: SST-2 accuracy with a fixed linear probe (benchmarks).
"""
