"""The benchmark layer: a measuring library (timing), the suites (one per op, plus generation),
their registry (suites), the runner and the report. `pytorch-mqa bench` is in cli/bench.py."""
