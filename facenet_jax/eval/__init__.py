"""Evaluation: the protocol and its metrics, embedding, pairs, verification sets, IJB,
cross-validation and their figures.

    metrics            the LFW k-fold protocol, ROC, retrieval, one-shot (pure numpy)
    reporting          how numbers are shown (unresolved VAL@FAR, spreads across runs)
    plots              figures (ROC, distance histograms, embedding maps, curves, fold bars)
    threshold          a trained run's own verification threshold, read back
    embed              make_embedder, load_encoder -> Encoder (embed, distance, verify)
    evaluate           a run's split (or a folder + pairs file) scored → eval.json + figures
    verification_sets  insightface `.bin` sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW)
    ijb                IJB-B / IJB-C 1:1 template verification
    crossval           the LFW protocol over the folds of a pairs file, one run per fold
    evaluators         the registry of evaluators: every entry listed in one place
    cli                `python -m facenet_jax.evaluate`
    verify             `python -m facenet_jax.verify`

Import the submodule you need (`from facenet_jax.eval import metrics`); this package imports
none of them, so numpy-only users never load jax.
"""
