"""The streamserve command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from streamserve import __version__
from streamserve.errors import StreamServeError

log = logging.getLogger("streamserve")

DEFAULT_CONFIG = "pipeline.yaml"


def _setup_logging(level: str, log_format: str = "auto") -> None:
    from streamserve.observe.logs import setup_logging

    setup_logging(level, log_format)  # type: ignore[arg-type]  # argparse restricts it to the choices


def _add_config(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "-c",
        "--config",
        required=required,
        type=Path,
        help="pipeline YAML file (env vars STREAMSERVE_<SECTION>__<KEY> override its keys)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Run a worker until SIGTERM/SIGINT, then drain and leave the group."""
    from streamserve.app import Worker
    from streamserve.config import load_settings

    settings = load_settings(args.config)
    worker = Worker(settings)

    def give_up() -> None:
        # Closing a client can block when its coordinator vanished (a broker restart); the orchestrator's
        # grace period is the hard limit, so exit on our own first. Nothing is lost once drained.
        log.error("shutdown did not complete within %.0fs; exiting (drained=%s)", deadline_s, worker.drained)
        logging.shutdown()
        os._exit(0 if worker.drained else 1)

    deadline_s = settings.shutdown_timeout_s + 10

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: finishing the current batch, committing, leaving the group", signal.Signals(signum).name)
        worker.stop()
        watchdog = threading.Timer(deadline_s, give_up)
        watchdog.daemon = True
        watchdog.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create the pipeline's topics."""
    from streamserve.admin import ensure_topics, pipeline_topics
    from streamserve.config import load_settings

    settings = load_settings(args.config)
    topics = pipeline_topics(settings, args.partitions)
    ensure_topics(settings.kafka.common(), topics)
    for topic in topics:
        print(f"{topic.name}\t{topic.partitions} partition(s)\t{topic.config or ''}")
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    """Produce synthetic card transactions (the demo's schema) to the input topic."""
    from streamserve.config import load_settings
    from streamserve.demo.data import make_entities, make_events
    from streamserve.pipeline.decode import load_schema
    from streamserve.tools import produce_avro

    settings = load_settings(args.config)
    entities = make_entities(n_cards=args.cards, seed=args.entity_seed)
    sent = produce_avro(
        settings.kafka.producer_config(),
        settings.input.topic,
        load_schema(settings.input.schema_path),
        make_events(entities, args.count, seed=args.seed),
        settings.input.key_field,
        rate=args.rate,
        progress_every=max(args.count // 10, 1),
    )
    print(f"produced {sent} events to {settings.input.topic}")
    return 0


def cmd_features_load(args: argparse.Namespace) -> int:
    """Bulk-load entity features from CSV/Parquet into Redis hashes."""
    import redis

    from streamserve.tools import load_features, load_packed_features, read_rows

    client = redis.Redis.from_url(args.redis_url)
    if args.packed:
        fields = args.packed.split(",")
        written = load_packed_features(client, read_rows(args.file), args.key_template, fields)
        print(f"wrote {written} packed float32 vectors [{args.packed}] to {args.redis_url} ({args.key_template})")
        return 0
    written = load_features(client, read_rows(args.file), args.key_template)
    print(f"wrote {written} hashes to {args.redis_url} ({args.key_template})")
    return 0


def _control_config(args: argparse.Namespace) -> tuple[dict[str, str | int | float | bool], str, str]:
    if args.config is not None:
        from streamserve.config import load_settings

        settings = load_settings(args.config)
        return settings.kafka.common(), settings.control.topic, settings.control.status_topic
    bootstrap = args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise StreamServeError("give -c PIPELINE.yaml, --bootstrap-servers, or set KAFKA_BOOTSTRAP_SERVERS")
    return {"bootstrap.servers": bootstrap}, args.control_topic, args.status_topic


def cmd_models_publish(args: argparse.Namespace) -> int:
    """Announce a model version on the control topic."""
    from streamserve.control.publish import publish

    config, topic, status_topic = _control_config(args)
    announcement = publish(
        config,
        topic,
        status_topic,
        args.model,
        args.version,
        args.uri,
        args.sha256,
        args.action,
        args.share,
        args.notes,
    )
    print(
        f"announced {announcement.action} {announcement.model} {announcement.version} "
        f"(sha256 {announcement.sha256[:12]}..., previous {announcement.baseline_version}) on {topic}"
    )
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    """Announce a rollback to the previous (or a named) version."""
    from streamserve.control.publish import rollback

    config, topic, _ = _control_config(args)
    announcement = rollback(config, topic, args.model, args.to, args.notes)
    print(f"announced rollback of {announcement.model} {announcement.baseline_version} -> {announcement.version}")
    return 0


def cmd_models_status(args: argparse.Namespace) -> int:
    """Print what every worker serves."""
    from datetime import UTC, datetime

    from streamserve.control.publish import fleet_status

    config, _, status_topic = _control_config(args)
    rows = fleet_status(config, status_topic)
    if not rows:
        print(f"no worker has reported on {status_topic} yet")
        return 0
    print(f"{'WORKER':<28} {'MODEL':<12} {'VERSION':<10} {'MODE':<8} {'CANDIDATE':<10} {'STATE':<9} SINCE / REASON")
    for s in rows:
        since = datetime.fromtimestamp(s.since / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        detail = f"{since}" + (f"  rejected {s.rejected_version}: {s.reason}" if s.reason else "")
        print(
            f"{s.worker_id:<28} {s.model:<12} {s.serving_version:<10} {s.mode:<8} "
            f"{s.candidate_version or '-':<10} {s.state:<9} {detail}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run an example end to end on the local stack: the card-fraud demo (default) or the predictive-maintenance
    example (a nested, nullable schema and a multi-input scikit-learn model with string labels)."""
    if args.example == "maintenance":
        from streamserve.demo.maintenance import run_example

        return run_example(args.config or Path("examples/maintenance/pipeline.yaml"), args.events, args.partitions)
    from streamserve.demo.run import run_demo

    return run_demo(args.config or Path("examples/fraud/pipeline.yaml"), args.events, args.partitions)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="streamserve",
        description="Streaming inference: Avro events from Kafka, features from Redis, ONNX micro-batches, "
        "Avro predictions out; model versions hot-swapped through a control topic.",
    )
    parser.add_argument("--version", action="version", version=f"streamserve {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("STREAMSERVE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (default INFO; env STREAMSERVE_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        default=os.environ.get("STREAMSERVE_LOG_FORMAT", "auto"),
        help="json: one JSON object per line with worker id, topic, partitions, offsets, batch id, model version "
        "and trace id; text: human-readable; auto (default): text on a terminal, JSON otherwise "
        "(env STREAMSERVE_LOG_FORMAT). Secrets are masked either way",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run a worker (workers with one config form one consumer group)", description=cmd_run.__doc__
    )
    _add_config(run)
    run.set_defaults(func=cmd_run)

    topics = sub.add_parser("topics", help="topic administration").add_subparsers(dest="action", required=True)
    create = topics.add_parser("create", help="create the pipeline's input, output, DLQ, control, status topics")
    _add_config(create)
    create.add_argument("--partitions", type=int, default=4, help="partitions of input/output topics (4)")
    create.set_defaults(func=cmd_topics_create)

    produce = sub.add_parser(
        "produce", help="produce synthetic demo events (load generator)", description=cmd_produce.__doc__
    )
    _add_config(produce)
    produce.add_argument("--count", type=int, default=10_000, help="events to produce (10000)")
    produce.add_argument("--rate", type=float, default=None, help="events per second (unlimited)")
    produce.add_argument("--seed", type=int, default=11, help="seed of the events (event ids depend on it)")
    produce.add_argument("--cards", type=int, default=2000, help="number of distinct cards (2000)")
    produce.add_argument("--entity-seed", type=int, default=7, help="seed of the cards and merchants (7)")
    produce.set_defaults(func=cmd_produce)

    features = sub.add_parser("features", help="feature store tools").add_subparsers(dest="action", required=True)
    load = features.add_parser(
        "load",
        help="bulk-load entity features from CSV/Parquet into Redis hashes",
        description=cmd_features_load.__doc__,
    )
    load.add_argument("--file", type=Path, required=True, help="CSV with a header row, or .parquet")
    load.add_argument("--key-template", required=True, help="Redis key from row columns, e.g. 'card:{card_id}'")
    load.add_argument("--packed", metavar="COL,COL", help="write one float32 vector of these columns per row")
    load.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    load.set_defaults(func=cmd_features_load)

    models = sub.add_parser("models", help="model versions on the control topic").add_subparsers(
        dest="action", required=True
    )
    for name, func, help_text in (
        ("publish", cmd_models_publish, "announce a version: deploy, canary or shadow"),
        ("rollback", cmd_models_rollback, "return to the previous version (or --to VERSION)"),
        ("status", cmd_models_status, "show the version and state of every worker"),
    ):
        cmd = models.add_parser(name, help=help_text, description=func.__doc__)
        _add_config(cmd, required=False)
        cmd.add_argument("--bootstrap-servers", help="instead of -c: brokers (default $KAFKA_BOOTSTRAP_SERVERS)")
        cmd.add_argument("--control-topic", default="streamserve.control", help="instead of -c")
        cmd.add_argument("--status-topic", default="streamserve.status", help="instead of -c")
        cmd.set_defaults(func=func)
        if name != "status":
            cmd.add_argument("--model", required=True, help="model name (the control topic's key)")
            cmd.add_argument("--notes", help="free text kept with the announcement")
        if name == "publish":
            cmd.add_argument("--version", required=True, dest="version")
            cmd.add_argument("--uri", required=True, help="artifact: path, file://, http(s)://")
            cmd.add_argument("--sha256", help="artifact digest (computed from the artifact when readable)")
            cmd.add_argument("--action", choices=["deploy", "canary", "shadow"], default="deploy")
            cmd.add_argument("--share", type=float, default=0.1, help="canary share of keys (0.1)")
        if name == "rollback":
            cmd.add_argument("--to", help="version to return to (default: the one before the current)")

    demo = sub.add_parser(
        "demo", help="run the card-fraud demo end to end on a running local stack", description=cmd_demo.__doc__
    )
    demo.add_argument(
        "--example", choices=["fraud", "maintenance"], default="fraud", help="which example to run (fraud)"
    )
    demo.add_argument("-c", "--config", type=Path, help="pipeline config (the example's pipeline.yaml)")
    demo.add_argument("--events", type=int, default=20_000, help="events to stream (20000)")
    demo.add_argument("--partitions", type=int, default=4, help="partitions of the demo topics (4)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `streamserve` command."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except StreamServeError as exc:
        print(f"streamserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
