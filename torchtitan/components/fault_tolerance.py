"""Surviving preemption, numerical faults and crashes (see docs/fault_tolerance.md).

Three pieces the trainer composes, each independent of the model:

- ``PreemptionHandler``: SIGTERM/SIGUSR1 only set a flag; the step loop finishes the step
  it is in, writes a checkpoint synchronously and exits with ``preemption_exit_code``. A
  watchdog ends the process if that takes longer than the grace time.
- ``StepGuard``: once per step, before the optimizer, one all-reduce tells every rank
  whether any rank saw a non-finite loss or grad norm and whether any rank was signalled,
  so all ranks skip the same steps and stop at the same step.
- ``FaultInjector``: test-only faults (SIGKILL, a signal, a freeze, a NaN) at a given rank and step,
  driven by the ``TORCHTITAN_FAULT_INJECT`` environment variable; inert when it is unset.

Crashes themselves need nothing here: torchrun (``MAX_RESTARTS``) restarts the job and the
checkpoint manager resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan.tools.logging import logger

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_NON_FINITE",
    "EXIT_GRACE_EXPIRED",
    "FaultInjector",
    "NonFiniteError",
    "Preempted",
    "PreemptionHandler",
    "StepGuard",
    "StepVerdict",
]

EXIT_BAD_INPUT = 2  # a config, checkpoint, dataset or tokenizer problem: fix the input
EXIT_NON_FINITE = 4  # stopped on non-finite loss/grad norm; the last good checkpoint is intact
EXIT_GRACE_EXPIRED = 5  # signalled, but the step plus its checkpoint overran the grace time

FAULT_ENV = "TORCHTITAN_FAULT_INJECT"


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or grad norm (policy ``stop`` or too many skips)."""


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is written; carries the exit code."""

    def __init__(self, step: int, exit_code: int):
        super().__init__(f"preempted: checkpoint of step {step} written, exiting with code {exit_code}")
        self.step = step
        self.exit_code = exit_code


class PreemptionHandler:
    """Turns the given signals into a flag the loop polls; restores the old handlers on close.

    A signal handler must not run collectives or write files (it interrupts arbitrary code),
    so it only records the request and arms the grace-time watchdog.
    """

    def __init__(self, signal_names: Iterable[str], grace_seconds: float, exit_code: int):
        self.signals = [getattr(signal, name) for name in signal_names]
        self.grace_seconds = grace_seconds
        self.exit_code = exit_code
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._watchdog: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption signals are not handled: the trainer is not on the main thread")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            return
        self.received = signum
        logger.warning(
            f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, "
            f"then exiting with code {self.exit_code}"
        )
        if self.grace_seconds > 0:
            self._watchdog = threading.Timer(self.grace_seconds, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _expire(self) -> None:
        logger.error(
            f"fault_tolerance.preemption_grace_seconds ({self.grace_seconds:g}s) ran out before the "
            f"preemption checkpoint was written; exiting with code {EXIT_GRACE_EXPIRED} (resume "
            "uses the previous complete checkpoint)"
        )
        os._exit(EXIT_GRACE_EXPIRED)


@dataclass(frozen=True)
class StepVerdict:
    non_finite: bool  # some rank saw a non-finite loss or grad norm this step
    preempt: bool  # some rank was signalled: every rank stops after this step


class StepGuard:
    """The per-step agreement between ranks, and the skip/stop policy for non-finite steps.

    Once per step, before the optimizer, ``decide`` agrees on two flags in one all-reduce.
    With fused optimizers (``lagged``) the flags gate the update on device and the host
    reads them one step later, when that step has long finished (no pipeline bubble);
    otherwise they are read at once and a non-finite step returns ``skip``. Either way,
    a stop raises ``NonFiniteError`` with ``last_good_step`` set to the step whose weights
    are current, and ``preempt_after_step`` tells the loop to checkpoint and exit.
    """

    def __init__(self, policy: str, max_consecutive_skips: int, device: torch.device, lagged: bool = False):
        if policy not in ("skip", "stop"):
            raise ValueError(f"fault_tolerance.non_finite_policy = {policy!r}: use skip or stop")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.device = device
        self.lagged = lagged
        self.consecutive_skips = 0
        self.total_skips = 0
        self.last_good_step = 0
        self.preempt_after_step = False
        self._pending: tuple[int, torch.Tensor] | None = None

    def flags(self, loss: torch.Tensor, grad_norm: torch.Tensor | float, preempt: bool) -> torch.Tensor:
        """[non-finite on some rank, signalled on some rank] as a float tensor on the device,
        agreed by one all-reduce (max), with no host sync: ``flags[0]`` can gate a fused
        optimizer on device, and ``verdict`` reads both later."""
        bad = ~torch.isfinite(_local(loss).detach().float()).all()
        if isinstance(grad_norm, torch.Tensor):
            bad = bad | ~torch.isfinite(_local(grad_norm).detach().float()).all()
        elif not math.isfinite(grad_norm):
            bad = torch.ones((), dtype=torch.bool, device=bad.device)
        signalled = torch.full((), float(preempt), device=bad.device)  # a fill, not a host copy
        flags = torch.stack([bad.float(), signalled]).to(self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    @staticmethod
    def verdict(flags: torch.Tensor) -> StepVerdict:
        """Read agreed ``flags`` on the host (waits for the step that produced them)."""
        non_finite, signalled = (v > 0 for v in flags.tolist())
        return StepVerdict(non_finite=non_finite, preempt=signalled)

    def decide(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float, preempt: bool
    ) -> tuple[bool, torch.Tensor | None]:
        """Agree on ``step``; return (skip the optimizer, ``found_inf`` for a fused one)."""
        flags = self.flags(loss, grad_norm, preempt)
        if self.lagged:
            self.settle()  # the previous step's verdict, long finished
            self._pending = (step, flags)
            return False, flags[0]
        return self._apply(step, self.verdict(flags)), None

    def settle(self) -> None:
        """Read and apply the pending verdict of the last step (lagged mode; a host sync)."""
        if self._pending is not None:
            step, flags = self._pending
            self._pending = None
            self._apply(step, self.verdict(flags))

    def _apply(self, step: int, verdict: StepVerdict) -> bool:
        """Apply the agreed verdict of ``step``; True if it was skipped."""
        self.preempt_after_step |= verdict.preempt
        if verdict.non_finite:
            self.last_good_step = step - 1
            self.on_non_finite(step)
            return True
        self.consecutive_skips = 0
        return False

    def on_non_finite(self, step: int) -> None:
        """Count a skipped step; raise NonFiniteError when the policy says stop."""
        self.consecutive_skips += 1
        self.total_skips += 1
        if self.policy == "stop":
            raise NonFiniteError(
                f"non-finite loss or grad norm at step {step} (fault_tolerance.non_finite_policy = "
                "stop); the last good state is checkpointed: lower optimizer.lr or inspect the data"
            )
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteError(
                f"non-finite loss or grad norm in {self.consecutive_skips} consecutive steps up to "
                f"step {step} (fault_tolerance.max_consecutive_skips = {self.max_consecutive_skips}); "
                "the last good state is checkpointed: lower optimizer.lr or inspect the data"
            )
        logger.warning(
            f"step {step}: non-finite loss or grad norm, step skipped (no optimizer update; "
            f"{self.consecutive_skips} in a row, {self.total_skips} in all)"
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class _Fault:
    kind: str  # kill | sigterm | sigusr1 | sigstop | nan | oom
    rank: int
    step: int
    attempt: int | None  # torchrun restart count it applies to; None = every attempt


class FaultInjector:
    """Test-only faults, from ``TORCHTITAN_FAULT_INJECT="kind:rank:step[@attempt],..."``.

    ``kind`` is ``kill`` (SIGKILL, as from the OOM killer or a lost node), ``sigterm`` /
    ``sigusr1`` (as from a scheduler's preemption notice), ``sigstop`` (the process freezes
    until it gets SIGCONT, as under a debugger or a frozen cgroup; a test changes files
    under a running trainer meanwhile), ``nan`` (the loss and this rank's gradients
    become NaN) or ``oom`` (``torch.OutOfMemoryError`` raised on this rank alone, while the
    others wait in a collective). Each fault fires once per job: a marker file in
    ``once_dir`` (the dump folder) remembers it across torchrun restarts, so a restarted
    job does not die at the same place. ``@attempt`` instead limits a fault to one torchrun
    attempt (``TORCHELASTIC_RESTART_COUNT``).
    """

    KINDS = ("kill", "sigterm", "sigusr1", "sigstop", "nan", "oom")

    def __init__(self, spec: str, rank: int, attempt: int, once_dir: str | None = None):
        self.once_dir = once_dir
        self.faults: list[_Fault] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                kind, rank_s, rest = item.split(":")
                step_s, _, attempt_s = rest.partition("@")
                fault = _Fault(kind, int(rank_s), int(step_s), int(attempt_s) if attempt_s else None)
            except ValueError:
                raise ValueError(f"{FAULT_ENV}: bad entry {item!r}; use kind:rank:step[@attempt]") from None
            if fault.kind not in self.KINDS:
                raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}; use one of {', '.join(self.KINDS)}")
            if fault.rank == rank and fault.attempt in (None, attempt):
                self.faults.append(fault)

    @classmethod
    def from_env(cls, rank: int, once_dir: str | None = None) -> FaultInjector:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        return cls(os.environ.get(FAULT_ENV, ""), rank, attempt, once_dir)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def before_optimizer(
        self, step: int, loss: torch.Tensor, params: Iterable[torch.Tensor]
    ) -> torch.Tensor:
        """Apply this step's faults (gradients are computed, the optimizer has not run)."""
        for fault in self.faults:
            if fault.step != step or self._fired_before(fault):
                continue
            logger.warning(f"{FAULT_ENV}: injecting {fault.kind} at step {step}")
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)  # SIGKILL is asynchronous: never run past this point
            elif fault.kind in ("sigterm", "sigusr1", "sigstop"):
                os.kill(os.getpid(), getattr(signal, fault.kind.upper()))
            elif fault.kind == "nan":
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(float("nan"))
                loss = loss * float("nan")
            elif fault.kind == "oom":
                raise torch.OutOfMemoryError(f"{FAULT_ENV}: injected out-of-memory at step {step}")
        return loss

    def _fired_before(self, fault: _Fault) -> bool:
        """True if this fault already fired in this job; otherwise record that it fires now."""
        if fault.attempt is not None or self.once_dir is None:
            return False
        marker = os.path.join(self.once_dir, f".fault_{fault.kind}_{fault.rank}_{fault.step}")
        if os.path.exists(marker):
            return True
        os.makedirs(self.once_dir, exist_ok=True)
        with open(marker, "w") as f:
            f.flush()
            os.fsync(f.fileno())
        return False
