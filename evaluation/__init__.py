"""Evaluation: held-out pass rate and response length of a model version on a reference environment
(:mod:`evaluation.evaluator`), the out-of-distribution instruction-following check (:mod:`evaluation.ood`),
the paper's per-round table (:mod:`evaluation.table`) and the ``oel eval`` command (:mod:`evaluation.cli`).
The learner's gates use it; it knows nothing of how a version is trained."""
