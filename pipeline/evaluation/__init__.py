"""Evaluation: trained runs -> the numbers and figures people compare.

    runs        which runs a report compares (models x seeds, ablations, the probe) and what each recorded
    variants    train one model under a seed and overrides (the `seeds@*` and `ablation@*` stages)
    probe       the linear-probe baseline
    robustness  trained models scored on dropped or noisy test inputs
    stats       mean ± std, paired bootstrap, Holm-adjusted p
    report      reports/summary.md + .json; figures: its PNGs
    experiment  the few numbers DVC compares across runs (metrics/*.json)

Sits on top: imports training/ and below, and nothing imports it but stages and tools.
"""
