"""Tools beside the pipeline library, run from the repository root:

    python -m tools.demo    the synthetic demo corpus generator (raw/demo)
    python -m tools.bench   feature-stage and training benchmarks
    python -m tools.bench_moe   the two MoE routing implementations, timed
"""
