"""
Runs one scenario in this process: ``python -m benchmarks._run NAME PARAMS_JSON``.

It prints ``RESULT {json}`` on its last line of standard output and exits with 0; a crash
prints its traceback on standard error and exits with 2. (Verification problems are part of the
result; the caller decides what they mean.) relayer's log, at warning level and above, goes to
the file named by the ``log`` parameter, as an application's log would.
"""

from __future__ import annotations

import json
import resource
import sys
import traceback
from typing import Any


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _log_to(path: str | None) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    stream = open(path, "a") if path else open("/dev/null", "w")  # noqa: SIM115
    observer = FilteringLogObserver(
        textFileLogObserver(stream), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: list[str]) -> int:
    name, params = argv[0], json.loads(argv[1])
    _raise_file_limit()
    _log_to(params.get("log"))
    from benchmarks import scenarios

    if name in scenarios.PLAIN_SCENARIOS:
        result = scenarios.PLAIN_SCENARIOS[name](params)
    else:
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        run = scenarios.RELAYER_SCENARIOS[name]
        outcome: dict[str, Any] = {}

        async def go() -> None:
            try:
                outcome["result"] = await run(reactor, params)
            except BaseException:
                outcome["error"] = traceback.format_exc()
            finally:
                reactor.stop()

        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(go()))
        reactor.run()
        if "error" in outcome:
            sys.stderr.write(outcome["error"])
            return 2
        if "result" not in outcome:
            sys.stderr.write("the scenario was interrupted\n")
            return 2
        result = outcome["result"]
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(2)
