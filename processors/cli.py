"""`oel processor`: run a worker of the Faust processor."""

from __future__ import annotations

import logging

import click

log = logging.getLogger(__name__)

METRICS_PORT = 9101


@click.command("processor")
@click.option("--loglevel", default="info", show_default=True, help="Faust worker log level.")
@click.pass_context
def processor(ctx: click.Context, loglevel: str) -> None:
    """Run one processor worker: assemble episodes from oel.trajectories, extract experience with the
    model, append it to the knowledge base in the object store, publish updates on oel.experience.

    Start several (on one or more machines) to share the partitions. Configuration: OEL_PROCESSOR__*
    (batching, abandonment, extraction prompt), OEL_MODEL__* (which model extracts), OEL_KAFKA__*,
    OEL_S3__*; metrics on OEL_METRICS__PORT (default 9101).
    """
    from oel.cli_context import settings_of
    from oel.extraction import PromptVariant
    from oel.knowledge import KnowledgeWriter, WriterConfig
    from oel.metrics import add_readiness_check, start_metrics_server
    from oel.model.factory import extraction_backend, model_token_counter, token_counter
    from oel.ops.topics import admin_client, ensure_topics, kafka_readiness
    from oel.store import S3Store
    from oel.topics import topic_specs
    from oel.versions import BASE_VERSION
    from processors.app import Processor, internal_topic_specs, make_worker

    s = settings_of(ctx)
    p = s.processor
    ensure_topics(admin_client(s.kafka), topic_specs(s) + internal_topic_specs(s))
    store = S3Store(s.s3)
    store.ensure_bucket()
    config = WriterConfig.from_settings(s)
    # The grounded variant calls no model: its tokenizer alone counts the KB's tokens, and a (re)started worker
    # does not wait for the weights to load.
    backend = None if config.extraction.variant is PromptVariant.grounded else extraction_backend(s)
    writer = KnowledgeWriter(
        store,
        backend,
        model_version=BASE_VERSION,
        config=config,
        count_tokens=token_counter(backend) if backend is not None else model_token_counter(s),
    )
    add_readiness_check("kafka", kafka_readiness(s.kafka))
    add_readiness_check("object store", store.unreachable)
    start_metrics_server(s.metrics.for_service(METRICS_PORT), "processor")
    proc = Processor(s, writer)
    from oel.metrics import add_liveness_check

    add_liveness_check("processor", proc.liveness_problem)
    log.info("processor %s starting on %s", p.app_id, s.kafka.bootstrap_servers)
    make_worker(proc.app, loglevel).execute_from_commandline()
