"""Sample-quality evaluation, one job per file.

- ``features``:  feature extractors (registry, TF-compatible Inception via torch-fidelity)
- ``metrics``:   FID / IS / KID formulas and feature moments
- ``reference``: reference statistics (from the training shards with a cache, or from a file)
- ``evaluator``: the in-training evaluator (FID every ``eval.every_images``)
- ``validation``: the pinned-noise validation loss on held-out shards
- ``command``:   the standalone ``python -m trainer.evaluate`` command

The evaluation config (``EvalConfig``) lives with the other config dataclasses in trainer.config.
"""
