"""Scenario processes: start them, sample their CPU and memory, tell when their output is complete, stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient


@dataclass(frozen=True)
class Sample:
    """One reading of a scenario's processes (and of the broker and Redis) at a wall-clock time."""

    wall_ms: float
    cpu_s: float
    rss_bytes: int
    server_cpu_s: float
    wait_s: float = 0.0
    """Seconds the scenario's threads were runnable but waited for a CPU (Linux schedstat; 0 elsewhere)."""
    busy_s: float = 0.0
    """CPU seconds the whole machine spent busy (every process, the kernel included)."""


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process so far."""
    times = proc.cpu_times()
    return times.user + times.system


def thread_waits(pid: int) -> dict[int, float]:
    """Seconds each thread of a process spent runnable on a run queue, waiting for a CPU (/proc schedstat)."""
    waits: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                waits[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
    return waits


def _waited(pid: int) -> float:
    """Seconds the process's threads spent waiting for a CPU, all together."""
    return sum(thread_waits(pid).values())


def _busy() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "guest", 0.0)


class Sampler:
    """Reads CPU seconds and RSS of a set of processes every `interval_s`, in a background thread."""

    def __init__(self, pids: list[int], server_pids: list[int], interval_s: float = 0.25) -> None:
        self._procs = [psutil.Process(pid) for pid in pids]
        self._servers = [psutil.Process(pid) for pid in server_pids if psutil.pid_exists(pid)]
        self._last_cpu = {p.pid: 0.0 for p in self._procs}
        self._last_wait = {p.pid: 0.0 for p in self._procs}
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._take()
        self._thread.start()
        return self

    def _take(self) -> None:
        rss = 0
        for proc in self._procs:
            try:
                with proc.oneshot():
                    self._last_cpu[proc.pid] = cpu_seconds(proc)
                    rss += proc.memory_info().rss
                self._last_wait[proc.pid] = _waited(proc.pid) or self._last_wait[proc.pid]
            except psutil.NoSuchProcess:
                pass  # exited: keep its last CPU reading
        server_cpu = 0.0
        for proc in self._servers:
            with contextlib.suppress(psutil.NoSuchProcess):
                server_cpu += cpu_seconds(proc)
        self.samples.append(
            Sample(
                time.time() * 1000,
                sum(self._last_cpu.values()),
                rss,
                server_cpu,
                sum(self._last_wait.values()),
                _busy(),
            )
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join()
        self._take()
        return self.samples


@dataclass
class Job:
    """One scenario's processes, started from argv lists, logging to files."""

    name: str
    commands: list[list[str]]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Job:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A pipeline override in the caller's environment must not reach the workers under test.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")}
        for i, argv in enumerate(self.commands):
            log_path = self.log_dir / f"{self.name}-{i}.log"
            with log_path.open("ab") as log_file:
                self.processes.append(
                    subprocess.Popen(
                        argv,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env={**inherited, **self.env, "STREAMSERVE_WORKER_ID": f"{self.name}-{i}"},
                        cwd=self.cwd,
                    )
                )
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def log_tail(self, lines: int = 30) -> str:
        tails = []
        for i in range(len(self.commands)):
            text = (self.log_dir / f"{self.name}-{i}.log").read_text(errors="replace").splitlines()
            tails.append(f"--- {self.name}-{i}\n" + "\n".join(text[-lines:]))
        return "\n".join(tails)

    def check_alive(self) -> None:
        """Raise with the log tail when a process died."""
        for proc in self.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: process exited with {proc.returncode}\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every process (they drain and leave the group), SIGKILL what is left after the timeout."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float = 30.0) -> tuple[int, int]:
    """(low, high) offsets of a partition; a topic created a moment ago may not have a leader yet: retry."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=5)
            return low, high
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class TopicCounter:
    """Counts the records on a topic from its watermarks (cheap: no records are read)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
        self._partitions = [TopicPartition(topic, p) for p in range(partitions)]

    def count(self) -> int:
        total = 0
        for tp in self._partitions:
            low, high = watermarks(self._consumer, tp)
            total += high - low
        return total

    def close(self) -> None:
        self._consumer.close()


class GroupWatcher:
    """Notes the wall-clock time a consumer group first is stable with all its members (in a thread)."""

    def __init__(self, bootstrap: str, group: str, members: int, interval_s: float = 0.1) -> None:
        self._admin = AdminClient({"bootstrap.servers": bootstrap})
        self.group, self.members, self.interval_s = group, members, interval_s
        self.stable_ms: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GroupWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while self.stable_ms is None and not self._stop.wait(self.interval_s):
            try:
                found = self._admin.describe_consumer_groups([self.group], request_timeout=5)[self.group].result()
            except KafkaException:
                continue
            if found.state == ConsumerGroupState.STABLE and len(found.members) >= self.members:
                self.stable_ms = time.time() * 1000

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.stable_ms


def wait_for_count(
    counter: TopicCounter, expected: int, timeout_s: float, job: Job, interval_s: float = 0.25
) -> tuple[int, bool]:
    """Poll until the topic holds `expected` records; returns (count, complete)."""
    deadline = time.monotonic() + timeout_s
    count = counter.count()
    while count < expected:
        if time.monotonic() > deadline:
            return count, False
        job.check_alive()
        time.sleep(interval_s)
        count = counter.count()
    return count, True
