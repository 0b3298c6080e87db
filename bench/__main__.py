"""``python -m bench [finetune generate classifier scaling pipeline]``: run benchmarks, print tables, write reports.

No names: all of them (``make bench``). Environment: BENCH_QUICK=1 (micro settings), BENCH_THREADS=n (torch
threads in every arm; default: 1 on a busy box, else all cores), BENCH_REPEATS=n, BENCH_KEEP=1 (keep the temp dir).
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

from bench.common import BenchResult, Settings, environment, report_paths, rmtree, write_reports

BENCHMARKS = {  # name -> module (``pipeline`` would shadow the project's package, hence ``repro``)
    "finetune": "bench.finetune",
    "generate": "bench.generate",
    "classifier": "bench.classifier",
    "scaling": "bench.scaling",
    "pipeline": "bench.repro",
}


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        if unknown:
            print(f"error: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2 if unknown else 0
    settings = Settings.from_env()
    env = environment(settings)
    print(f"bench: {', '.join(names)}; {settings.threads} torch thread(s) per arm ({settings.threads_why}); "
          f"{'BENCH_QUICK micro settings; ' if settings.quick else ''}work dir {settings.workdir}", flush=True)
    results: dict[str, BenchResult] = {}
    failed = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        try:
            results[name] = importlib.import_module(BENCHMARKS[name]).run(settings)
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            results[name] = BenchResult(name, data={"error": f"{type(exc).__name__}: {str(exc)[:2000]}"},
                                        targets=[{"name": f"{name} ran", "value": None, "threshold": None, "comparison": "",
                                                  "unit": "", "pass": False, "note": str(exc)[:300]}])
        print(f"-- {name}: {time.perf_counter() - t0:.0f} s\n", flush=True)
        print(results[name].markdown(), flush=True)
        write_reports(results, env, time.perf_counter() - start)
    total = time.perf_counter() - start
    write_reports(results, env, total)
    if not settings.keep:
        rmtree(settings.workdir)
    report_json, report_md, _ = report_paths()
    print(f"\nbench: {total:.0f} s; wrote {report_json} and {report_md}")
    passed = [t for r in results.values() for t in r.targets if t["pass"]]
    missed = [t for r in results.values() for t in r.targets if not t["pass"]]
    print(f"targets: {len(passed)} pass, {len(missed)} fail" + (f" ({'; '.join(t['name'] for t in missed)})" if missed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
