"""Evaluation suites behind ``kvarn eval``: accumulation, perplexity, divergence, humaneval, passkey, report.

Each suite module has a ``run_<suite>(...) -> SuiteResult`` function; ``kvarn.eval.io`` writes the
results (JSON, CSV, Markdown) and ``kvarn.eval.plots`` the PNG figures. Quantization is simulated
with ``kvarn.eval.simulated_cache.SimulatedQuantizedCache``. See docs/eval.md.
"""
