"""Benchmarks: question suites, methods side by side (leapdecode drafters and transformers baselines), reports.

    leapdecode bench --suite builtin --drafters none,pld,copy,hf-greedy,hf-pld --max-new-tokens 64
    leapdecode bench report bench-results/<timestamp>

From Python: build methods with `methods.build_method`, run them with `runner.run_bench`, render with
`report.write_report`.
"""
