"""Speed and memory benchmarks of glad_core, run as modules from the project root:
`python -m benchmarks.run` (training steps, inference, evaluation, memory; writes RESULTS.md),
`benchmarks.prompts` (CoCoOp batched), `benchmarks.guidg`, `benchmarks.mugcp`, `benchmarks.cluster`
(Dask batch runs). `--smoke` runs a script in seconds; its numbers mean nothing.
"""
