"""The content part of a scan, under a CPU budget, and the worker processes that run it.

What it does: the *content job* of one message is everything a scan computes from the message
bytes alone: the view's costly derived forms (MIME walk, decoded and HTML-rendered text, URLs),
every synchronous check of the PRE and MAIN phases (sanity, GTUBE, pattern rules, SpamAssassin
evals) and the `prepare` step of the checks that declare one (the domains a URI list looks up,
the Bayes tokens). It never does I/O. `run_content()` runs it in order and stops at the budget;
`ContentPool` runs it in forked worker processes, so that a message whose content is costly to
analyse (a pathological regex holds the GIL: a thread would not help) never holds the event
loop that serves every other message of both front ends. docs/architecture.md says what runs
where and why.

Trusts: nothing in the message; the checks to return symbols (not to finish: the budget
interrupts them).
Reads: scan.content_cpu_budget (CPU seconds per message for the whole job; 0 = unlimited),
scan.content_workers (processes; 0 = run the job on the event loop, without isolation),
scan.content_size_limit and scan.trusted_networks (to parse the message in a worker).
Emits (through filterd.pipeline): CONTENT_BUDGET (options: the step that crossed the budget,
CPU spent / budget) and CHECK_TIMEOUT (options: that step: a binding name, or view.FORM when
the view's own decoding crossed it). The remaining content steps are skipped; the checks whose
prepare step was skipped do not run; the network checks and the phases after MAIN still do.

The budget is enforced by a CPU timer (ITIMER_PROF) whose signal handler raises inside the
running step: CPython's regex engine checks for signals as it matches, so even a catastrophic
`re` pattern stops at the budget. Where no signal can be used (not the main thread) the budget
is checked between steps. A worker that does not answer (C code that never checks signals)
is killed shortly before the message deadline and replaced; the step it was in gets the blame.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from filterd.policy import Symbol

log = logging.getLogger("filterd.pipeline")

# The view's costly derived forms, computed as steps of their own so that their CPU counts as
# the view's (view.FORM in CONTENT_BUDGET) and not as that of whichever check read them first.
VIEW_FORMS = ("parts", "plain_texts", "urls")


class ContentBudgetExceeded(BaseException):
    """Raised inside a content step when the message's CPU budget is spent. A BaseException,
    so that a check's `except Exception` (which every lenient decoder has) cannot eat it."""


@dataclass(slots=True)
class ContentResult:
    symbols: dict[str, list[Symbol]] = field(default_factory=dict)  # binding -> its symbols
    prepared: dict[str, Any] = field(default_factory=dict)         # binding -> prepare()'s value
    notes: dict[str, Any] = field(default_factory=dict)            # the checks' ctx.notes
    cpu: float = 0.0                                               # CPU seconds of the job
    exceeded: str | None = None                                    # step that crossed the budget


# --- the CPU timer -------------------------------------------------------------------------
_armed = False


def _on_prof(signum: int, frame: Any) -> None:
    global _armed
    if _armed:
        _armed = False
        raise ContentBudgetExceeded()


def _timer_usable() -> bool:
    """ITIMER_PROF can interrupt this thread: it is the main thread and nobody else (a
    profiler) owns SIGPROF."""
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGPROF)
    if current is _on_prof:
        return True
    if current in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGPROF, _on_prof)
        return True
    return False


def _run_step(fn: Any, remaining: float, use_timer: bool) -> Any:
    global _armed
    if use_timer:
        _armed = True
        signal.setitimer(signal.ITIMER_PROF, max(remaining, 1e-6))
    try:
        return fn()
    finally:
        _armed = False
        if use_timer:
            signal.setitimer(signal.ITIMER_PROF, 0)


# --- the job -------------------------------------------------------------------------------
Steps = Sequence[tuple[str, str]]


def stages_for(phases: Sequence[tuple[Any, Sequence[tuple[Any, Any]]]]) -> list[list[tuple[str, str]]]:
    """The content steps of a scan plan, in two stages: the view's forms and the PRE checks
    (which the PRE phase waits for), then the MAIN checks and every prepare step (which the
    MAIN phase waits for while its network checks are in flight). ("view", FORM),
    ("check", BINDING), ("prepare", BINDING). No stage when no step reads the content."""
    from filterd.pipeline import Phase, is_content
    first: list[tuple[str, str]] = [("view", form) for form in VIEW_FORMS]
    second: list[tuple[str, str]] = []
    for phase, checks in phases:
        for binding, spec in checks:
            into = first if phase is Phase.PRE else second
            if is_content(spec):
                into.append(("check", binding.name))
            elif spec.prepare is not None:
                into.append(("prepare", binding.name))
    if len(first) == len(VIEW_FORMS) and not second:
        return []
    return [first, second]


def run_content(view: Any, ctx: Any, steps: Steps, budget: float,
                progress: Any = None) -> ContentResult:
    """Run content steps over one view with ctx (no I/O in it), within `budget` CPU seconds
    (None: no budget; <= 0: spent already). `progress`, when given, is a shared integer set
    to the index of the step being run (the pool reads it when it must kill a worker)."""
    from filterd.pipeline import REGISTRY, run_sync
    bindings = {b.name: b for b in ctx.ruleset.bindings}
    limited = budget is not None
    use_timer = limited and _timer_usable()
    result = ContentResult()
    started = time.process_time()
    step = ""
    for index, (kind, name) in enumerate(steps):
        if progress is not None:
            progress.value = index
        remaining = budget - (time.process_time() - started) if limited else 0.0
        step = f"view.{name}" if kind == "view" else name
        if limited and remaining <= 0:
            result.exceeded = step
            break
        try:
            if kind == "view":
                _run_step(lambda: getattr(view, name), remaining, use_timer)
                continue
            binding = bindings[name]
            spec = REGISTRY[binding.function]
            if kind == "check":
                result.symbols[name] = _run_step(
                    lambda: run_sync(binding, spec, view, ctx), remaining, use_timer)
            else:
                result.prepared[name] = _run_step(
                    lambda: spec.prepare(view, ctx, **binding.args), remaining, use_timer)
        except ContentBudgetExceeded:
            result.exceeded = step
            break
        except Exception as exc:  # a view form or a prepare step that raised
            log.warning("content step %s failed: %s: %s", step, type(exc).__name__, exc)
            if kind == "prepare":
                result.symbols[name] = [Symbol("CHECK_ERROR", (name, type(exc).__name__))]
    result.cpu = time.process_time() - started
    if limited and result.exceeded is None and result.cpu > budget:  # type: ignore[operator]
        # spent past the budget in the last step without a timer to stop it: its results
        # stand, and the budget is reported
        result.exceeded = step
    result.notes = ctx.notes
    return result


class ContentJob:
    """One message's content job: `await stage()` gives each stage's ContentResult in turn
    (empty ones after the budget was crossed); `close()` ends it."""

    def __init__(self, stages: Sequence[Steps], budget: float):
        self.stages = list(stages)
        self.budget = budget
        self.spent = 0.0
        self.exceeded: str | None = None
        self._next = 0

    def _remaining(self) -> float | None:
        return self.budget - self.spent if self.budget > 0 else None

    def _account(self, result: ContentResult) -> ContentResult:
        self.spent += result.cpu
        if result.exceeded and not self.exceeded:
            self.exceeded = result.exceeded
        return result

    async def stage(self) -> ContentResult:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return self._next >= len(self.stages)

    async def upto(self, phase: Any) -> ContentResult:
        """The stages a phase waits for, merged: the first for PRE, all of them after."""
        from filterd.pipeline import Phase
        last = 1 if phase is Phase.PRE else len(self.stages)
        merged = ContentResult()
        while self._next < last:
            result = await self.stage()
            merged.symbols.update(result.symbols)
            merged.prepared.update(result.prepared)
            merged.notes.update(result.notes)
            merged.cpu += result.cpu
            merged.exceeded = merged.exceeded or result.exceeded
        return merged

    def close(self) -> None:
        pass


class InlineJob(ContentJob):
    """The job run right here, on the caller's thread (tools, tests, scan.content_workers 0)."""

    def __init__(self, view: Any, ctx: Any, stages: Sequence[Steps], budget: float):
        super().__init__(stages, budget)
        self.view, self.ctx = view, ctx

    async def stage(self) -> ContentResult:
        index, self._next = self._next, self._next + 1
        if index >= len(self.stages) or self.exceeded:
            return ContentResult()
        return self._account(run_content(self.view, self.ctx, self.stages[index],
                                          self._remaining()))


# --- worker processes ----------------------------------------------------------------------
_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True, slots=True)
class _Job:
    raw: bytes
    envelope: Any
    stages: tuple[tuple[tuple[str, str], ...], ...]
    budget: float
    notes: dict[str, Any]


# Notes that stay in the worker: the rules' excerpts serve `filterd scan --explain`, which
# runs the job inline, and they carry the texts they were found in (13 KB a message on the
# corpora: a third of the cost of a job's answer).
LOCAL_NOTES = frozenset({"rule_matches"})


def _picklable_notes(notes: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in notes.items():
        if key in LOCAL_NOTES:
            continue
        try:
            pickle.dumps(value)
        except Exception:  # e.g. rule excerpts that are found only when read (--explain)
            continue
        out[key] = value
    return out


_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int, forked_on_main_thread: bool) -> None:
    """End this worker when the daemon ends, even by SIGKILL or the OOM killer: the kernel
    sends SIGKILL when the parent goes (Linux). That signal follows the thread that forked, so
    it is asked for only when that was the main thread; the pipe's EOF covers the rest."""
    if not forked_on_main_thread:
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the daemon died before prctl took effect
        os._exit(0)


def _worker_main(conn: Any, settings: Any, ruleset: Any, progress: Any, job_cpu: Any,
                 inherited: Sequence[Any], parent_pid: int = 0,
                 forked_on_main_thread: bool = False) -> None:
    """One worker: receive a job, parse, run each stage and send its ContentResult."""
    _die_with(parent_pid, forked_on_main_thread)
    # The parent's ends of every worker's pipe, this worker's own included: while a copy of
    # its own parent end stayed open here, the daemon's death never reached recv() as EOF
    # and the worker outlived it.
    for other in inherited:
        try:
            other.close()
        except OSError:
            pass
    # The daemon's handlers and its loop's wakeup fd came with the fork: a signal to this
    # process must not wake the daemon's loop, and SIGTERM must end this process.
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C reaches the daemon, which stops us
    from filterd.message import parse
    from filterd.pipeline import ScanContext
    trusted = list(settings.scan.trusted_networks)
    while True:
        try:
            job: _Job = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        job_cpu.value = time.process_time()  # the parent's watchdog measures from here
        try:
            view = parse(job.raw, job.envelope, content_limit=settings.scan.content_size_limit,
                         trusted_networks=trusted)
            ctx = ScanContext(settings=settings, ruleset=ruleset, notes=dict(job.notes))
            spent, exceeded = 0.0, False
            for steps in job.stages:
                if exceeded:
                    result = ContentResult()
                else:
                    remaining = job.budget - spent if job.budget > 0 else None
                    result = run_content(view, ctx, steps, remaining, progress)
                    spent += result.cpu
                    exceeded = result.exceeded is not None
                result.notes = _picklable_notes(result.notes)
                conn.send_bytes(pickle.dumps(result, _PROTOCOL))
        except (EOFError, OSError):
            return
        except BaseException as exc:  # report it; the parent turns it into an internal error
            try:
                error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                conn.send_bytes(pickle.dumps(error, _PROTOCOL))
            except Exception:
                return


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# How often a job that has not answered is looked at, and how far past its budget its CPU
# may go before the worker is killed: the budget's own timer stops Python code and the regex
# engines, but a C loop that never checks signals (seen: stdlib re's `<[^>]*>` over 1 MiB of
# "<a", 6 s for a 1 s budget) only stops with its process.
WATCH_INTERVAL = 0.25


def hard_limit(budget: float) -> float:
    return budget + max(0.5, budget)


class _Worker:
    def __init__(self, mp: Any, settings: Any, ruleset: Any, inherited: Sequence[Any]):
        parent_end, child_end = mp.Pipe()
        self.progress = mp.RawValue("i", -1)     # index of the step being run
        self.job_cpu = mp.RawValue("d", 0.0)     # the worker's CPU clock when its job began
        on_main = threading.current_thread() is threading.main_thread()
        self.process = mp.Process(target=_worker_main, name="filterd-content",
                                  args=(child_end, settings, ruleset, self.progress,
                                        self.job_cpu, [*inherited, parent_end], os.getpid(),
                                        on_main), daemon=True)
        self.process.start()
        child_end.close()
        self.conn = parent_end
        # answers read off the pipe (the loop's one reader per worker) and the stage
        # waiting for the next one
        self.replies: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[Any] | None = None
        self.loop: Any = None

    def watch(self, loop: Any) -> None:
        """Read this worker's answers on `loop` from now on (one reader for its life)."""
        self.loop = loop
        loop.add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            reply: Any = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:  # it died: whoever waits learns it
            self.loop.remove_reader(self.conn.fileno())
            reply = exc
            self.dead = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_result(reply)
        else:
            self.replies.append(reply)

    dead = False

    def job_seconds(self) -> float | None:
        """CPU seconds of the current job so far (None where /proc cannot tell)."""
        try:
            fields = open(f"/proc/{self.process.pid}/stat").read().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS - self.job_cpu.value

    def kill(self) -> None:
        if self.loop is not None and not self.conn.closed and not self.dead:
            self.loop.remove_reader(self.conn.fileno())
        try:
            self.process.kill()
            self.process.join(1.0)
        except Exception:
            pass
        self.conn.close()


class PoolJob(ContentJob):
    """The job in one worker of a ContentPool, which it holds until close()."""

    def __init__(self, pool: "ContentPool", worker: _Worker, stages: Sequence[Steps],
                 budget: float, deadline: float):
        super().__init__(stages, budget)
        self.pool, self.worker, self.deadline = pool, worker, deadline
        self._replace = False
        self.sent_at = asyncio.get_running_loop().time()

    async def stage(self) -> ContentResult:
        index, self._next = self._next, self._next + 1
        worker = self.worker
        if index >= len(self.stages) or worker is None:
            return ContentResult()
        if worker.replies:
            reply = worker.replies.popleft()
        else:
            loop = asyncio.get_running_loop()
            answer: asyncio.Future[Any] = loop.create_future()
            worker.waiter = answer
            try:
                reply = await self._watch(answer, loop)
            except asyncio.TimeoutError:
                # past the deadline or the hard CPU limit: kill the worker (a fresh one is
                # simpler than draining it), and blame its step, unless the job had less
                # than its budget of time in the worker (it waited for one: load, which
                # the caller's deadline turns into a tempfail)
                self._replace = True
                spent = worker.job_seconds()
                had = loop.time() - self.sent_at
                if self.budget <= 0 or (had < self.budget and (
                        spent is None or spent <= hard_limit(self.budget))):
                    self.close()
                    raise
                at = worker.progress.value
                steps = self.stages[index]
                kind, name = steps[at] if 0 <= at < len(steps) else ("view", "parse")
                step = f"view.{name}" if kind == "view" else name
                log.error("content worker %d stopped in %s: replaced", worker.process.pid, step)
                self.close()
                return self._account(ContentResult(
                    cpu=spent if spent is not None else (self._remaining() or 0.0),
                    exceeded=step))
            except BaseException:  # cancelled: the scan was given up; its answer is stale
                self._replace = True
                self.close()
                raise
            finally:
                worker.waiter = None
        if isinstance(reply, (EOFError, OSError)):
            self._replace = True
            self.close()
            raise RuntimeError(f"content worker died: {reply!r}")
        if isinstance(reply, BaseException):
            self.close()
            raise RuntimeError(f"content job failed: {reply!r}") from reply
        if index == len(self.stages) - 1:
            self.close()
        return self._account(reply)

    async def _watch(self, answer: "asyncio.Future[Any]", loop: Any) -> Any:
        """The worker's answer; TimeoutError at the deadline, or once the job's CPU is past
        hard_limit(budget) (looked at every WATCH_INTERVAL while it runs: one timer, and
        none of it for the common job that answers within the first interval)."""
        limit = hard_limit(self.budget) if self.budget > 0 else None
        stopped = False

        def look() -> None:
            nonlocal handle, stopped
            if answer.done():
                return
            spent = self.worker.job_seconds() if limit is not None and self.worker else None
            if loop.time() >= self.deadline or (spent is not None and spent > limit):
                if spent is not None and spent > limit:  # type: ignore[operator]
                    log.error("content job at %.1f CPU seconds, past %.1f: stopping it",
                              spent, limit)
                stopped = True
                answer.cancel()
                return
            handle = loop.call_later(min(WATCH_INTERVAL, max(self.deadline - loop.time(), 0.0)),
                                     look)

        handle = loop.call_later(min(WATCH_INTERVAL, max(self.deadline - loop.time(), 0.0)), look)
        try:
            return await answer
        except asyncio.CancelledError:
            if stopped:
                raise asyncio.TimeoutError from None
            raise
        finally:
            handle.cancel()

    def close(self) -> None:
        if self.worker is not None:
            if self._next < len(self.stages) and not self._replace:
                # closed before reading every stage (the deadline): the worker may still be
                # running; a fresh one is simpler than draining it
                self._replace = True
            self.pool._release(self.worker, replace=self._replace)
            self.worker = None


class ContentPool:
    """`size` forked processes holding one rule set; each runs one content job at a time.

    Forked, so that a worker has the compiled rule set without loading it again (a load
    compiles the Hyperscan database: seconds); the Scanner makes a new pool for each rule set
    it reloads and retires the old one once its jobs are done.
    """

    def __init__(self, settings: Any, ruleset: Any, size: int):
        self.settings = settings
        self.ruleset = ruleset
        self.size = max(1, size)
        self._mp = multiprocessing.get_context("fork")
        self._workers: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] | None = None
        self._loop: Any = None
        self._busy = 0
        self._waiting = 0
        self._retired = False
        self.replaced = 0       # workers killed and replaced (a step that never yielded)

    def start(self) -> "ContentPool":
        from filterd.pipeline import load_checks
        load_checks()  # every check module imported once, before the fork
        for _ in range(self.size):
            self._workers.append(self._spawn())
        return self

    def _spawn(self) -> _Worker:
        worker = _Worker(self._mp, self.settings, self.ruleset,
                         [w.conn for w in self._workers])
        if self._loop is not None:
            worker.watch(self._loop)
        return worker

    def _queue(self) -> asyncio.Queue[_Worker]:
        loop = asyncio.get_running_loop()
        if self._idle is None or loop is not self._loop:
            # first use, on the loop that will read the answers (the daemon has one for
            # life; a tool or test that runs several in turn gets the workers re-bound)
            self._loop = loop
            self._idle = asyncio.Queue()
            for worker in self._workers:
                worker.replies.clear()
                worker.watch(loop)
                self._idle.put_nowait(worker)
        return self._idle

    async def submit(self, raw: bytes, envelope: Any, stages: Sequence[Steps], budget: float,
                     notes: dict[str, Any], deadline: float) -> PoolJob:
        """Send one message's content job to the next free worker (waiting for one: the
        bound); its stages must be answered by `deadline` (loop time)."""
        queue = self._queue()
        self._waiting += 1
        try:
            worker = await queue.get()
        finally:
            self._waiting -= 1
        self._busy += 1
        job = PoolJob(self, worker, stages, budget, deadline)
        try:
            worker.progress.value = -1
            worker.replies.clear()  # a killed job's late answers belong to no one
            worker.conn.send_bytes(pickle.dumps(_Job(
                raw, envelope, tuple(tuple(s) for s in stages), budget,
                _picklable_notes(notes)), _PROTOCOL))
        except BaseException:
            job._replace = True
            job.close()
            raise
        return job

    def _release(self, worker: _Worker, *, replace: bool) -> None:
        self._busy -= 1
        if replace:
            self.replaced += 1
            worker.kill()
            if worker in self._workers:
                self._workers.remove(worker)
            if self._retired:
                if not self._busy and not self._waiting:
                    self.close()
                return
            worker = self._spawn()
            self._workers.append(worker)
        self._queue().put_nowait(worker)
        if self._retired and not self._busy and not self._waiting:
            self.close()

    def retire(self) -> None:
        """Stop when the jobs running or waiting now are done (a reload made a new pool)."""
        self._retired = True
        if not self._busy and not self._waiting:
            self.close()

    def close(self) -> None:
        self._retired = True
        for worker in self._workers:
            worker.kill()
        self._workers.clear()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid]


__all__ = ["ContentBudgetExceeded", "ContentJob", "ContentPool", "ContentResult", "InlineJob",
           "PoolJob", "VIEW_FORMS", "run_content", "stages_for"]
