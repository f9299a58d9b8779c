"""The check registry and the scan: run every bound check over one MessageView.

Trusts: the checks to return symbols; it does not trust them to finish or not to raise.
Reads: scan.deadline (whole message), scan.check_timeout (default per check), the bindings of
the rule set ([check.NAME] tables in rules/).
Emits: CHECK_ERROR (a check raised; options: binding, error type), CHECK_TIMEOUT (a check
overran its own timeout; options: binding). Both score 0 unless the scores table says
otherwise: one broken check must not turn into a tempfail storm. A missed whole-message
deadline is a *failure* ("deadline"), which the failures table maps to tempfail.

Reads also scan.content_cpu_budget. Emits CONTENT_BUDGET (filterd.pipeline.content).

The content job comes first (filterd.pipeline.content): every synchronous check of PRE and
MAIN and the `prepare` step of the checks that declare one, in a worker process when the
scan has a content runner (the daemon), else right here. Its symbols take their bindings'
places below. Past the content CPU budget the rest of the job is skipped, and so are the
checks whose prepare step did not run and the synchronous composites.

Phases run in order; the checks inside one phase run concurrently (network checks overlap):
  PRE       cheap checks that may force an action (allow/block lists, size, sanity)
  MAIN      antivirus, DNS lists, authentication, pattern rules
  CLASSIFY  learners that may read earlier symbols (Bayes)
  COMPOSITE meta rules over all symbols so far
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from filterd.message import MessageView
from filterd.policy import Symbol

log = logging.getLogger("filterd.pipeline")


class Phase(enum.IntEnum):
    PRE = 0
    MAIN = 1
    CLASSIFY = 2
    COMPOSITE = 3


CheckFunc = Callable[..., "Sequence[Symbol] | Awaitable[Sequence[Symbol]]"]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    name: str
    func: CheckFunc
    phase: Phase
    network: bool
    is_async: bool
    symbols: tuple[str, ...]     # symbols it may emit (for docs and lint); () = declared in rules
    # the part of an async check that only reads the message (filterd.pipeline.content):
    # prepare(msg, ctx, **args) -> a picklable value the check gets as `prepared=`
    prepare: Callable[..., Any] | None = None


REGISTRY: dict[str, CheckSpec] = {}

# Modules whose import registers checks. A module that is missing (an optional extra) is skipped.
CHECK_MODULES = (
    "filterd.checks.sanity",
    "filterd.checks.gtube",
    "filterd.ruleset.check",
    "filterd.checks.antivirus",
    "filterd.checks.banned",
    "filterd.checks.dnsbl",
    "filterd.checks.auth",
    "filterd.checks.bayes",
    "filterd.checks.sa_evals",
)


def check(name: str, *, phase: Phase = Phase.MAIN, network: bool = False,
          symbols: Sequence[str] = (),
          prepare: Callable[..., Any] | None = None) -> Callable[[CheckFunc], CheckFunc]:
    """Register a check function: `fn(msg, ctx, **args) -> list[Symbol]` (sync or async).

    An async check whose CPU work on the message can be separated from its I/O declares
    `prepare(msg, ctx, **args) -> value` (synchronous, no I/O, picklable result): it runs in
    the content job (filterd.pipeline.content) and the check is called with `prepared=value`.
    """

    def register(func: CheckFunc) -> CheckFunc:
        if name in REGISTRY and REGISTRY[name].func is not func:
            raise ValueError(f"check {name!r} registered twice")
        REGISTRY[name] = CheckSpec(name, func, phase, network,
                                   inspect.iscoroutinefunction(func), tuple(symbols), prepare)
        return func

    return register


def is_content(spec: CheckSpec) -> bool:
    """Whether a check runs in the content job, off the event loop: a synchronous check of
    PRE or MAIN reads only the message and the symbols of earlier synchronous checks. The
    synchronous checks of CLASSIFY and COMPOSITE read network results (auth, every symbol)
    and cost no more than the number of rules: they run on the loop after the network."""
    return not spec.is_async and not spec.network and spec.phase <= Phase.MAIN


def load_checks() -> dict[str, CheckSpec]:
    for module in CHECK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
    return REGISTRY


def validate_bindings(ruleset: Any) -> None:
    """Every [check.X] names a registered function and passes arguments it accepts."""
    from filterd.ruleset import RulesetError
    registry = load_checks()
    for binding in ruleset.bindings:
        spec = registry.get(binding.function)
        if spec is None:
            raise RulesetError(binding.source, f"check.{binding.name}.function",
                               f"no registered check {binding.function!r} (known: "
                               f"{', '.join(sorted(registry))})")
        params = inspect.signature(spec.func).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for arg in binding.args:
            if not accepts_any and arg not in params:
                raise RulesetError(binding.source, f"check.{binding.name}.args.{arg}",
                                   f"check {binding.function!r} takes no argument {arg!r}")
        required = [n for n, p in list(params.items())[2:]
                    if p.default is p.empty and p.kind is p.KEYWORD_ONLY]
        for arg in required:
            if arg not in binding.args:
                raise RulesetError(binding.source, f"check.{binding.name}.args",
                                   f"check {binding.function!r} needs argument {arg!r}")


@dataclass
class ScanContext:
    """Everything a check may use besides the message: I/O clients, stores, settings, clock.

    Checks take I/O from here, never from module globals, so a test hands in a loopback server.
    """

    settings: Any
    ruleset: Any
    deadline: float = 0.0                       # loop.time() by which the scan must end
    dns: Any = None                             # async resolver (filterd.dns)
    clamd: Any = None                           # clamd client (filterd.checks.antivirus)
    stores: Any = None                          # Bayes etc. (filterd.stores)
    services: dict[str, Any] = field(default_factory=dict)  # other shared clients by name
    symbols: list[Symbol] = field(default_factory=list)     # symbols of earlier phases
    notes: dict[str, Any] = field(default_factory=dict)     # per-message scratch for checks
    # runs the content job elsewhere (a ContentPool's run); None: run it here, on the loop
    content_runner: Any = None
    prepared: dict[str, Any] = field(default_factory=dict)  # binding -> its prepare() value

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def has_symbol(self, name: str) -> bool:
        return any(s.name == name for s in self.symbols)


@dataclass(frozen=True, slots=True)
class ScanResult:
    symbols: tuple[Symbol, ...]
    timings: dict[str, float]                   # phase name -> seconds
    failure: str | None = None                  # "deadline", "internal_error" or None


def run_sync(binding: Any, spec: CheckSpec, view: MessageView, ctx: ScanContext) -> list[Symbol]:
    """A synchronous check; what it raises becomes CHECK_ERROR (the content budget's
    interruption is a BaseException and goes through)."""
    try:
        return list(spec.func(view, ctx, **binding.args) or ())
    except Exception as exc:
        log.warning("check %s failed: %s: %s", binding.name, type(exc).__name__, exc)
        return [Symbol("CHECK_ERROR", (binding.name, type(exc).__name__))]


async def _run_one(binding: Any, spec: CheckSpec, view: MessageView, ctx: ScanContext,
                   default_timeout: float) -> list[Symbol]:
    if not spec.is_async:
        return run_sync(binding, spec, view, ctx)
    timeout = min(binding.timeout or default_timeout, max(ctx.remaining(), 0.0))
    args = binding.args
    if spec.prepare is not None:
        args = {**args, "prepared": ctx.prepared.get(binding.name)}
    try:
        # a timer on the running task, not wait_for's extra task per check
        async with asyncio.timeout(timeout):
            result = await spec.func(view, ctx, **args)
        return list(result or ())
    except asyncio.TimeoutError:
        log.warning("check %s timed out after %.2fs", binding.name, timeout)
        return [Symbol("CHECK_TIMEOUT", (binding.name,))]
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("check %s failed: %s: %s", binding.name, type(exc).__name__, exc)
        return [Symbol("CHECK_ERROR", (binding.name, type(exc).__name__))]


# plan() per rule set: key (skip_network, ids of the bindings and their specs); the value
# keeps the bindings alive, so their ids are not reused while cached.
_PLANS: dict[tuple[Any, ...], tuple[list[Any], list[tuple[Phase, list[tuple[Any, CheckSpec]]]]]] = {}


def plan(ruleset: Any, *, skip_network: bool = False) -> list[tuple[Phase, list[tuple[Any, CheckSpec]]]]:
    """The bound checks grouped by phase, in phase order (computed once per rule set)."""
    bindings = ruleset.bindings
    key = (skip_network, *[(id(b), id(REGISTRY.get(b.function))) for b in bindings])
    cached = _PLANS.get(key)
    if cached is not None:
        return cached[1]
    result = _plan(bindings, skip_network)
    if len(_PLANS) >= 64:
        _PLANS.clear()
    # keyed after load_checks() ran in _plan, so the next call finds it
    _PLANS[(skip_network, *[(id(b), id(REGISTRY.get(b.function))) for b in bindings])] = (
        list(bindings), result)
    return result


def _plan(bindings: Sequence[Any], skip_network: bool
          ) -> list[tuple[Phase, list[tuple[Any, CheckSpec]]]]:
    registry = load_checks()
    by_phase: dict[Phase, list[tuple[Any, CheckSpec]]] = {}
    for binding in bindings:
        spec = registry[binding.function]
        if not binding.enabled or (skip_network and spec.network):
            continue
        by_phase.setdefault(spec.phase, []).append((binding, spec))
    return sorted(by_phase.items())


async def _run_phase(phase: Phase, checks: Sequence[tuple[Any, CheckSpec]], view: MessageView,
                     ctx: ScanContext, default_timeout: float, job: Any) -> list[list[Symbol]]:
    """One phase's checks, results in binding order. The async ones (network I/O) run as
    tasks started first, so their waits overlap the content job's stage for this phase (in a
    worker, or right here); the checks that need a prepared value start once it is there,
    and the other synchronous ones (CLASSIFY, COMPOSITE) run here after it."""
    tasks = {i: asyncio.ensure_future(_run_one(b, s, view, ctx, default_timeout))
             for i, (b, s) in enumerate(checks) if s.is_async and s.prepare is None}
    batches: list[list[Symbol]] = [[] for _ in checks]
    try:
        if tasks:
            await asyncio.sleep(0)  # let each task run up to its first wait (queries sent)
        if job is not None and not job.done:
            content = await job.upto(phase)
            ctx.prepared.update(content.prepared)
            ctx.notes.update(content.notes)
            if content.exceeded:
                batches[0][:0] = _budget_symbols(ctx, job)
        else:
            content = None
        for i, (binding, spec) in enumerate(checks):
            if is_content(spec):
                batches[i] += content.symbols.get(binding.name, ()) if content else ()
            elif spec.prepare is not None:
                if binding.name in ctx.prepared:
                    tasks[i] = asyncio.ensure_future(
                        _run_one(binding, spec, view, ctx, default_timeout))
                elif content is not None:  # its prepare step raised (CHECK_ERROR)
                    batches[i] += content.symbols.get(binding.name, ())
            elif not spec.is_async:
                if job is not None and job.exceeded and phase is Phase.COMPOSITE:
                    continue  # composites of missing content symbols would misfire
                batches[i] += await _run_one(binding, spec, view, ctx, default_timeout)
        for i, task in tasks.items():
            batches[i] += await task
        return batches
    finally:
        for task in tasks.values():  # deadline (cancelled): stop what is still running
            task.cancel()


def _budget_symbols(ctx: ScanContext, job: Any) -> list[Symbol]:
    budget = ctx.settings.scan.content_cpu_budget
    log.warning("content CPU budget (%gs) spent in %s: the remaining content checks skipped",
                budget, job.exceeded)
    return [Symbol("CHECK_TIMEOUT", (job.exceeded,)),
            Symbol("CONTENT_BUDGET", (job.exceeded, f"{job.spent:.2f}s/{budget:g}s"))]


async def scan(view: MessageView, ctx: ScanContext, *, skip_network: bool = False) -> ScanResult:
    """Run every bound check over the message within ctx.deadline."""
    loop = asyncio.get_running_loop()
    settings = ctx.settings
    if not ctx.deadline:
        ctx.deadline = loop.time() + settings.scan.deadline
    default_timeout = settings.scan.check_timeout
    timings: dict[str, float] = {}
    phases = plan(ctx.ruleset, skip_network=skip_network)
    try:
        # waiting for a free content worker is load, not the message's cost: a message that
        # gets none before its deadline fails as any late scan does (tempfail), unblamed
        async with asyncio.timeout_at(ctx.deadline):
            job = await _content_job(view, ctx, phases)
    except asyncio.TimeoutError:
        return ScanResult(tuple(ctx.symbols), timings, failure="deadline")
    try:
        for phase, checks in phases:
            started = time.perf_counter()
            if ctx.remaining() <= 0:
                return ScanResult(tuple(ctx.symbols), timings, failure="deadline")
            try:
                async with asyncio.timeout_at(loop.time() + max(ctx.remaining(), 0.0)):
                    batches = await _run_phase(phase, checks, view, ctx, default_timeout, job)
                for batch in batches:
                    ctx.symbols.extend(batch)
            except asyncio.TimeoutError:
                timings[phase.name.lower()] = time.perf_counter() - started
                return ScanResult(tuple(ctx.symbols), timings, failure="deadline")
            timings[phase.name.lower()] = time.perf_counter() - started
            if ctx.remaining() <= 0:
                return ScanResult(tuple(ctx.symbols), timings, failure="deadline")
        return ScanResult(tuple(ctx.symbols), timings)
    finally:
        if job is not None:
            job.close()


async def _content_job(view: MessageView, ctx: ScanContext,
                       phases: Sequence[tuple[Phase, Sequence[tuple[Any, CheckSpec]]]]) -> Any:
    """The message's content job (filterd.pipeline.content): in a worker when the scan has
    a content runner (ContentPool.submit), else run here; None when nothing reads content."""
    from filterd.pipeline.content import InlineJob, stages_for
    stages = stages_for(phases)
    if not stages:
        return None
    budget = ctx.settings.scan.content_cpu_budget
    if ctx.content_runner is None:
        return InlineJob(view, ctx, stages, budget)
    # the worker's answer must come before the deadline, with a second left to decide and
    # answer the MTA: a worker that never answers ends in CONTENT_BUDGET, not in a 451
    return await ctx.content_runner(view.raw, view.envelope, stages, budget, ctx.notes,
                                    ctx.deadline - 1.0)
