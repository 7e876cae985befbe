"""The evaluation harness: data sets, judges, generation, the safety model organism, baselines,
the demo, the sweeps and benchmarks. It uses the patcher (mscp.core, mscp.continual); the patcher
never imports it."""
