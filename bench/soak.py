"""Soak: seeded faults against the local upstream, and the rate limiter in real time.

1. resume: N streams, a fraction faulted at random points (drop, stall, 429 with Retry-After,
   500/503, in-band overloaded error); with `on_interrupt="resume"` every completion must be
   byte-identical to the fault-free text: no duplicated and no lost characters.
2. raise: the same faults with `on_interrupt="raise"` (a stream's default): faults before any
   content are retried away; faults after content raise the documented error carrying exactly
   the text received before the fault.
3. limiter: 600 requests/minute, burst 10, 5 concurrent; 200 requests queued at once from 50
   threads, then from 200 async tasks; reports the achieved rate and peak concurrency.

Run: python bench/soak.py [--streams 1000] [--fault-rate 0.2] [--seed 7] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from typing import Any

import anyio

import holysheep
from holysheep import (
    IdleTimeoutError,
    RateLimiter,
    RetryPolicy,
    StreamError,
    StreamInterruptedError,
    Timeouts,
)
from holysheep.testing import UpstreamConfig, serve

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
TOKENS = 60
POLICY = RetryPolicy(attempts=5, wait_initial=0.01, wait_max=0.05, wait_jitter=0.01)


def plan_faults(n: int, rate: float, seed: int) -> list[dict[str, Any] | None]:
    """A seeded fault (or None) for each stream, at a random point in it."""
    rng = random.Random(seed)
    plan: list[dict[str, Any] | None] = []
    for _ in range(n):
        if rng.random() >= rate:
            plan.append(None)
            continue
        at = rng.randint(0, TOKENS - 1)
        kind = rng.choice(["drop", "stall", "429", "500", "503", "inband_error"])
        if kind in ("429", "500", "503"):
            fault = {"kind": "status", "status": int(kind)}
            if kind == "429":
                fault["retry_after"] = 0.01
        else:
            fault = {"kind": kind, "after": at}
        plan.append({"fault": fault})
    return plan


def run_resume(n: int, rate: float, seed: int) -> dict[str, Any]:
    plan = plan_faults(n, rate, seed)
    with serve(tokens=TOKENS, event_ids=True) as upstream:
        reference = "".join(UpstreamConfig(tokens=TOKENS).token_list(None))
        client = holysheep.Client(
            api_key="soak",
            base_url=upstream.base_url,
            retry=POLICY,
            on_interrupt="resume",
            timeout=Timeouts(ttft=0.5, idle=0.2),
        )
        identical = recovered = failed = duplicated = lost = 0
        started = time.perf_counter()
        for fault in plan:
            if fault is not None:
                upstream.enqueue(fault)
            try:
                text = client.chat.complete(model="gpt-4.1", messages=MESSAGES).text
            except holysheep.HolySheepError:
                failed += 1
                continue
            if text == reference:
                identical += 1
                recovered += fault is not None
            else:
                duplicated += max(0, len(text) - len(reference))
                lost += max(0, len(reference) - len(text))
        elapsed = time.perf_counter() - started
        client.close()
    faulted = sum(f is not None for f in plan)
    return {
        "streams": n,
        "faulted": faulted,
        "recovered": recovered,
        "recovery_rate": recovered / faulted if faulted else 1.0,
        "identical": identical,
        "failed": failed,
        "duplicated_chars": duplicated,
        "lost_chars": lost,
        "seconds": round(elapsed, 2),
    }


def run_raise(n: int, rate: float, seed: int) -> dict[str, Any]:
    plan = plan_faults(n, rate, seed)
    tokens = UpstreamConfig(tokens=TOKENS).token_list(None)
    reference = "".join(tokens)
    exact = wrong = retried_away = 0
    with serve(tokens=TOKENS) as upstream:
        client = holysheep.Client(
            api_key="soak",
            base_url=upstream.base_url,
            retry=POLICY,
            on_interrupt="raise",  # complete() would restart by default
            timeout=Timeouts(ttft=0.5, idle=0.2),
        )
        for entry in plan:
            if entry is not None:
                upstream.enqueue(entry)
            fault = entry["fault"] if entry else None
            before_content = fault is None or fault["kind"] == "status" or fault["after"] == 0
            try:
                text = client.chat.complete(model="gpt-4.1", messages=MESSAGES).text
                ok = before_content and text == reference
                retried_away += fault is not None and ok
            except (StreamInterruptedError, IdleTimeoutError, StreamError) as exc:
                assert fault is not None
                expected = "".join(tokens[: fault["after"]])
                documented = {
                    "drop": StreamInterruptedError,
                    "stall": IdleTimeoutError,
                    "inband_error": StreamError,
                }[fault["kind"]]
                partial = exc.completion.text if exc.completion is not None else ""
                ok = isinstance(exc, documented) and partial == expected
            exact += ok
            wrong += not ok
        client.close()
    return {
        "streams": n,
        "faulted": sum(e is not None for e in plan),
        "exact": exact,
        "wrong": wrong,
        "retried_before_content": retried_away,
    }


def run_limiter(requests: int, threads: int) -> dict[str, Any]:
    with serve(tokens=5, tokens_per_s=100) as upstream:
        return {
            flavour: _limiter_round(upstream.base_url, flavour, requests, threads)
            for flavour in ("threads", "tasks")
        }


def _limiter_round(base_url: str, flavour: str, requests: int, threads: int) -> dict[str, Any]:
    limiter = RateLimiter(requests_per_minute=600, burst=10, max_concurrent=5)
    starts: list[float] = []
    peak = 0
    lock = threading.Lock()

    def note() -> None:
        nonlocal peak
        with lock:
            starts.append(time.monotonic())
            peak = max(peak, limiter.in_flight)

    began = time.monotonic()
    if flavour == "threads":
        client = holysheep.Client(api_key="soak", base_url=base_url, limiter=limiter)

        def worker() -> None:
            for _ in range(requests // threads):
                with client.chat.stream(model="m", messages=MESSAGES) as stream:
                    note()
                    stream.until_done()

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        client.close()
    else:

        async def main() -> None:
            async with holysheep.AsyncClient(
                api_key="soak", base_url=base_url, limiter=limiter
            ) as aclient:

                async def one() -> None:
                    async with aclient.chat.stream(model="m", messages=MESSAGES) as stream:
                        note()
                        await stream.until_done()

                async with anyio.create_task_group() as tg:
                    for _ in range(requests):
                        tg.start_soon(one)

        anyio.run(main)
    starts.sort()
    steady = starts[10:]  # after the burst of 10
    span = steady[-1] - steady[0] if len(steady) > 1 else 0.0
    return {
        "requests": len(starts),
        "seconds": round(time.monotonic() - began, 2),
        "admitted_in_first_0.5s": sum(1 for s in starts if s - began < 0.5),
        "steady_rate_per_minute": round((len(steady) - 1) / span * 60, 1) if span else None,
        "peak_concurrency": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n = 40 if args.quick else args.streams
    report = {
        "resume": run_resume(n, args.fault_rate, args.seed),
        "raise": run_raise(n, args.fault_rate, args.seed),
        "limiter": run_limiter(20 if args.quick else 200, 10 if args.quick else 50),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for section, values in report.items():
            print(f"== {section} ==")
            print(json.dumps(values, indent=2))
    resume, raised = report["resume"], report["raise"]
    ok = (
        resume["failed"] == 0
        and resume["duplicated_chars"] == 0
        and resume["lost_chars"] == 0
        and raised["wrong"] == 0
    )
    print(("PASS" if ok else "FAIL") + ": resume byte-identical, raise exact", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
