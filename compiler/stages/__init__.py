"""The pipeline stages, one module each, in the order `compiler.pipeline.run_pipeline` runs them:
export, sparsity, quantize, vocab, precision, verify, build. Each takes the settings and typed
inputs and returns a typed result (`compiler.results`)."""
