"""Follows the control topic from its beginning (outside the inference group) and reports status.

Every record goes through the rollout state machine (rollout.py) - at start-up while catching up, and
live afterwards - then the worker realizes the newest accepted state it can load. Nothing one record
does stops the follower: whatever fails is a rejection with its reason on the status topic. Should the
follower thread stop or stall anyway, ``healthy()`` turns false and the worker stops (see app.py).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, Producer

from streamserve.config import ControlSettings
from streamserve.control.announcements import WorkerStatus
from streamserve.control.fetch import redact
from streamserve.control.reading import acceptance_policy, read_topic_to_end
from streamserve.control.registry import ModelRegistry
from streamserve.control.rollout import DesiredState, Rejection, RolloutState
from streamserve.errors import ArtifactUnavailable, ControlPlaneFailed
from streamserve.observe.kafkalog import TransientAtStart

log = logging.getLogger(__name__)
log.addFilter(TransientAtStart())  # the broker's start-up answers ("Coordinator load in progress") while they pass

LibrdkafkaConfig = dict[str, str | int | float | bool]
MAX_RETRY_S = 300.0


@dataclass(frozen=True)
class LastRejection:
    """The last announcement refused, or accepted state this worker could not load, and why."""

    reason: str
    generation: int | None
    version: str | None
    at_ms: int


class ControlFollower:
    """Replays and follows the control topic for one model, realizes it in a registry, reports status."""

    def __init__(
        self,
        common_config: LibrdkafkaConfig,
        settings: ControlSettings,
        registry: ModelRegistry,
        worker_id: str,
        status_interval_s: float = 10.0,
        on_rejected: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.control_topic = settings.topic
        self.status_topic = settings.status_topic
        self.registry = registry
        self.worker_id = worker_id
        self.status_interval_s = status_interval_s
        self.policy = acceptance_policy(settings, registry.settings.name)
        if not self.policy.require_signatures:
            log.warning(
                "announcements on %s are not required to be signed: anyone who can write to it can deploy a model "
                "(configure control.trusted_keys)",
                self.control_topic,
            )
        self.rollout = RolloutState()
        self._on_rejected: Callable[[str], None] = on_rejected or (lambda kind: None)
        """Told the kind of every rejection (announcement, unavailable, unservable): the swaps metric."""
        self.last_rejection: LastRejection | None = None
        self.loading_version: str | None = None
        self.error: BaseException | None = None
        self._unservable: dict[int, str] = {}
        """Generations whose artifacts failed here for good (digest, onnxruntime, signature, warm-up)."""
        self._retry_at: float | None = None
        self._retry_s = settings.retry_interval_s
        self._consumer = Consumer(
            {
                **common_config,
                "group.id": f"streamserve-control-{uuid.uuid4()}",  # never committed: we always re-read
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 50,
            }
        )
        self._producer = Producer({**common_config, "linger.ms": 0})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------------

    def catch_up(self, timeout_s: float = 30.0) -> None:
        """Replay the whole topic through the state machine, then serve the newest state that loads."""

        def offer(_key: bytes | None, value: bytes | None) -> None:
            self._offer(value)

        read_topic_to_end(self._consumer, self.control_topic, timeout_s, offer)
        self._converge()
        self.report()

    def start(self) -> None:
        """Follow new announcements in a background thread."""
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._supervised, name="streamserve-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following and close the clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                log.error("control follower did not stop within 10s; leaving its clients to the process exit")
                return
        self._consumer.close()
        self._producer.flush(5)

    def healthy(self) -> bool:
        """The follower thread runs and went round within control.follower_timeout_s."""
        if self.error is not None or self._thread is None:
            return self.error is None
        if not self._thread.is_alive():
            return self._stop.is_set()
        return time.monotonic() - self._last_beat < self.settings.follower_timeout_s

    def raise_if_failed(self) -> None:
        """Raise ControlPlaneFailed when the follower is not healthy."""
        if not self.healthy():
            cause = f"{type(self.error).__name__}: {self.error}" if self.error else "stopped or stalled"
            raise ControlPlaneFailed(f"control-topic follower failed ({cause}); stopping instead of serving stale")

    # -- the loop ----------------------------------------------------------------------------------

    def _supervised(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            # Per-record failures never get here (see _offer/_converge): this is the follower itself dying.
            self.error = exc
            log.critical("control follower stopped: %s", exc, exc_info=True)
            try:
                self.report(state="failed")
                self._producer.flush(5)
            except Exception:
                log.exception("could not report the control follower's failure")

    def _run(self) -> None:
        next_report = time.monotonic() + self.status_interval_s
        while not self._stop.is_set():
            self._last_beat = time.monotonic()
            try:
                messages = self._consumer.consume(num_messages=100, timeout=0.2)
            except KafkaException as exc:
                log.warning("control topic consumer: %s", exc)
                continue
            changed = False
            for msg in messages:
                if msg.error() is None:
                    changed = self._offer(msg.value()) or changed
            if changed or (self._retry_at is not None and time.monotonic() >= self._retry_at):
                self._last_beat = time.monotonic()
                self._converge()
                self.report()
                next_report = time.monotonic() + self.status_interval_s
            if time.monotonic() >= next_report:
                self.report()
                next_report = time.monotonic() + self.status_interval_s
            self._producer.poll(0)

    def _offer(self, value: bytes | None) -> bool:
        """Run one record through the state machine; True when it was accepted."""
        before = self.rollout.generation
        try:
            self.rollout, rejection = self.rollout.offer_record(value, self.policy)
        except Exception as exc:  # noqa: BLE001 - a record nobody foresaw is a rejection, never the follower's end
            rejection = Rejection(f"unexpected {type(exc).__name__} while verifying: {exc}")
            log.error("verifying a control record failed:\n%s", traceback.format_exc())
        if rejection is not None:
            self._reject(rejection.reason, rejection.generation, rejection.version, "announcement")
        return self.rollout.generation != before

    def _converge(self) -> None:
        """Serve the newest accepted state this worker can load; older accepted states are the fallback."""
        self._retry_at = None
        for desired in reversed(self.rollout.history):
            if desired == self.registry.serving:
                break
            if desired.generation in self._unservable:
                continue
            if self._realize(desired):
                break
        if self._retry_at is None:
            self._retry_s = self.settings.retry_interval_s

    def _realize(self, desired: DesiredState) -> bool:
        self.loading_version = desired.version
        self.report(state="loading")
        try:
            self.registry.realize(desired)
            return True
        except ArtifactUnavailable as exc:
            # Possibly transient (network, object store): keep serving, try again later.
            self._retry_at = time.monotonic() + self._retry_s
            self._retry_s = min(self._retry_s * 2, MAX_RETRY_S)
            self._reject(f"cannot load here, retrying: {exc}", desired.generation, desired.version, "unavailable")
        except Exception as exc:  # noqa: BLE001 - corrupt ONNX, bad signature, a warm-up that raises: report, go on
            self._unservable[desired.generation] = str(exc)
            log.error(
                "generation %d (%s) cannot serve here:\n%s", desired.generation, desired.version, traceback.format_exc()
            )
            reason = f"cannot serve here: {type(exc).__name__}: {exc}"
            self._reject(reason, desired.generation, desired.version, "unservable")
        finally:
            self.loading_version = None
        return False

    def _reject(self, reason: str, generation: int | None, version: str | None, kind: str) -> None:
        self._on_rejected(kind)
        log.error("rejected %s %s (generation %s): %s", self.registry.settings.name, version, generation, reason)
        self.last_rejection = LastRejection(reason, generation, version, int(time.time() * 1000))
        self.report()

    # -- status ------------------------------------------------------------------------------------

    def state(self) -> str:
        """serving (the desired state), loading, or degraded (an older accepted state: the newest cannot load)."""
        if self.loading_version is not None:
            return "loading"
        desired = self.rollout.desired
        if desired is None or desired == self.registry.serving:
            return "serving"
        return "degraded"

    def report(self, state: str | None = None) -> None:
        """Publish this worker's status for its model."""
        routing = self.registry.routing
        desired = self.rollout.desired
        serving = self.registry.serving
        rejection = self.last_rejection
        status = WorkerStatus(
            worker_id=self.worker_id,
            model=self.registry.settings.name,
            state=state or self.state(),
            serving_version=routing.live.version,
            serving_uri=redact(routing.live.uri),
            serving_sha256=routing.live.sha256,
            mode=routing.mode,
            candidate_version=routing.candidate.version if routing.candidate else None,
            canary_share=routing.canary_share,
            loading_version=self.loading_version,
            rejected_version=rejection.version if rejection else None,
            reason=rejection.reason[:2000] if rejection else None,
            since=self.registry.since_ms,
            reported_at=int(time.time() * 1000),
            serving_generation=serving.generation if serving is not None else 0,
            desired_generation=desired.generation if desired is not None else 0,
            desired_version=desired.version if desired is not None else None,
            desired_mode=desired.mode if desired is not None else None,
            rejected_generation=rejection.generation if rejection else None,
            rejected_at=rejection.at_ms if rejection else None,
        )
        key = f"{self.worker_id}/{status.model}".encode()
        try:
            self._producer.produce(self.status_topic, status.encode(), key)
            self._producer.poll(0)
        except (BufferError, KafkaException) as exc:
            log.warning("status report not sent: %s", exc)
