"""Training: features -> one trained model per `train@<model>` stage.

    dataset     assemble the feature tables into one set (normalisation, step caps, leakage guard); batches
    train       one model: checkpoint chosen on validation, tested once, torchrun/DDP when launched so
    metrics     MAE, Corr, Acc-2/3/5/7, F1 with the MMSA definitions
    interpret   what a trained model learned (gates, experts, relation filter), written beside its metrics
    plots       PNG learning curves beside each model
    provenance  the hashes and selection records every result carries

Imports data/, features/, models/ and the top-level helpers; never evaluation/.
"""
