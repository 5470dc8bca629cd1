"""On-policy context distillation (OPCD): consolidating experience into the weights.

The student (current weights, no experience in context) samples its own answers to training
prefixes; the frozen teacher (the round-start weights, an experience block in context) scores the
same answer tokens; the student minimises the token-level reverse KL to the teacher, restricted to
its own top-k tokens. See ``learner.opcd.trainer`` for how a step runs and who the teacher is, and
``learner.opcd.data`` for the file formats. Run it from files with ``oel learner distill``.

Public API::

    from learner.opcd import OPCDConfig, OPCDTrainer, load_prefixes, load_experience_sets

    trainer = OPCDTrainer(OPCDConfig(steps=40), load_prefixes("prefixes.jsonl"),
                          load_experience_sets(["kb-run1.json", "kb-run2.json"]))
    result = trainer.train()
    trainer.save("out/adapter", result)
"""

from learner.opcd.config import OPCDConfig
from learner.opcd.data import (
    DataError,
    ExperienceCut,
    ExperienceTemplate,
    fit_experience,
    load_experience,
    load_experience_sets,
    load_prefixes,
    parse_conversation,
    render_experience,
)
from learner.opcd.loss import LossStats, chunked_opcd_loss, opcd_token_loss
from learner.opcd.trainer import SUMMARY_FILE, Check, OPCDResult, OPCDTrainer, Rollout, StepMetrics

__all__ = [
    "OPCDConfig",
    "OPCDTrainer",
    "OPCDResult",
    "Check",
    "Rollout",
    "StepMetrics",
    "LossStats",
    "SUMMARY_FILE",
    "DataError",
    "ExperienceCut",
    "ExperienceTemplate",
    "chunked_opcd_loss",
    "opcd_token_loss",
    "fit_experience",
    "load_experience",
    "load_experience_sets",
    "load_prefixes",
    "parse_conversation",
    "render_experience",
]
