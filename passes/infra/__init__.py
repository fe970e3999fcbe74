"""Pass infrastructure: the pass contract (base), the registry and settings checks, the
PassManager and its instruments, the calibration reducers, the layer-by-layer driver, and the
debugging engines built on the manager (a traced run for the report, bisection)."""
