"""All the benchmarks, side by side, in one command: one summary table of each
figure next to its target, written to the "## Summary" section of docs/benchmarks.md.

    python -m bench                            # every benchmark, small defaults
    python -m bench --only load,download,redis,submit --no-write

Each benchmark also writes its own section (unless --no-write). ``relay`` and
``fleet`` run as their own processes (``python -m bench.relay`` /
``bench.fleet`` with small round counts) and their verdict lines are read back;
``load``, ``download``, ``redis``, ``fanout``, ``submit``, ``engines``, ``batching``,
``structured``, ``prefix`` and ``prefix-routing`` are called in this process.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from bench import batching, download, engines, fanout, load, prefix, prefix_routing, redis_cmds, structured, submit
from bench.doc import replace_section, section_text
from bench.figure import Figure

#: name → the command line of each benchmark, with this suite's small defaults.
COMMANDS = {
    "relay": ["python", "-m", "bench.relay", "--runs", "15", "--ttft-runs", "100"],
    "fleet": ["python", "-m", "bench.fleet", "--runs", "2", "--jobs", "60"],
    "load": ["python", "-m", "bench.load", "--rounds", "7"],
    "download": ["python", "-m", "bench.download", "--rounds", "9"],
    "redis": ["python", "-m", "bench.redis_cmds", "--rounds", "3", "--tokens", "200"],
    "fanout": ["python", "-m", "bench.fanout", "--rounds", "3", "--seconds", "5"],
    "submit": ["python", "-m", "bench.submit", "--rounds", "3", "--seconds", "5"],
    "engines": ["python", "-m", "bench.engines", "--n", "1,8,16", "--runs", "2"],
    "batching": ["python", "-m", "bench.batching", "--runs", "2"],
    "structured": ["python", "-m", "bench.structured", "--runs", "2"],
    "prefix": ["python", "-m", "bench.prefix", "--runs", "2"],
    "prefix-routing": ["python", "-m", "bench.prefix_routing"],
}
IN_PROCESS = {
    "load": load.main, "download": download.main, "redis": redis_cmds.main, "fanout": fanout.main, "submit": submit.main,
    "engines": engines.main, "batching": batching.main, "structured": structured.main, "prefix": prefix.main,
    "prefix-routing": prefix_routing.main,
}


def relay_figures(stdout: str) -> list[Figure]:
    figures = []
    for m in re.finditer(r"- (\S+): throughput ratio ([\d.]+)× — target ≥ ([\d.]+)× (met|MISSED)", stdout):
        figures.append(Figure("relay", f"tokens/s through the hive / in process, {m[1]}", f"≥ {m[3]}×", f"{m[2]}×", m[4] == "met"))
    pattern = r"- (\S+): throughput.*\n\s+Added TTFT ([+\-\d.]+) ms, p99 ([+\-\d.]+) ms — target (.+?) (met|MISSED);"
    for m in re.finditer(pattern, stdout):
        figures.append(Figure("relay", f"added warm TTFT (median, p99), {m[1]}", m[4], f"{m[2]}, p99 {m[3]} ms", m[5] == "met"))
    pattern = r"- (\S+): throughput[^\n]*\n(?:  [^\n]*\n)*?  The hive's own part[^:]*: ([\d.]+) ms, p99 ([\d.]+) ms"
    for m in re.finditer(pattern, stdout):
        figures.append(Figure("relay", f"the hive's own part of the warm TTFT (median, p99), {m[1]}", "report", f"{m[2]}, p99 {m[3]} ms", None))
    return figures


def fleet_figures(stdout: str) -> list[Figure]:
    figures = []
    for m in re.finditer(r"- Load (\d+%): (\d+) of (\d+) jobs waited more than (\d+) ms while a worker was idle \(target 0: (met|MISSED)\)", stdout):
        figures.append(Figure("fleet", f"jobs waiting > {m[4]} ms while a worker was idle, load {m[1]}", "0", f"{m[2]} of {m[3]}", m[5] == "met"))
    if m := re.search(r"- Warm TTFT (\d+) ms; cold (\d+) ms when cached on disk", stdout):
        figures.append(Figure("fleet", "warm / cold (cached) TTFT, 135M", "report", f"{m[1]} / {m[2]} ms", None))
    return figures


def run_subprocess(name: str, write: bool) -> list[Figure]:
    command = [sys.executable, *COMMANDS[name][1:]] + ([] if write else ["--no-write"])
    print(f"== {name}: {' '.join(COMMANDS[name])}", file=sys.stderr)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    print(done.stdout)
    figures = (relay_figures if name == "relay" else fleet_figures)(done.stdout)
    if done.returncode or not figures:
        figures.append(Figure(name, f"the run (exit {done.returncode})", "completes", "no figures read" if not figures else "failed", False))
    return figures


def run_in_process(name: str, write: bool) -> list[Figure]:
    argv = COMMANDS[name][3:] + ([] if write else ["--no-write"])
    print(f"== {name}: {' '.join(COMMANDS[name])}", file=sys.stderr)
    return IN_PROCESS[name](argv)


def table(figures: list[Figure]) -> str:
    verdict = {True: "met", False: "**MISSED**", None: "(reported)"}
    return "\n".join(
        ["| benchmark | figure | target | measured | met? |", "| --- | --- | --- | --- | --- |"]
        + [f"| {f.benchmark} | {f.figure} | {f.target} | {f.measured} | {verdict[f.met]} |" for f in figures]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(COMMANDS), help=f"comma-separated, of: {', '.join(COMMANDS)}")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args()
    selected = args.only.split(",")
    unknown = set(selected) - set(COMMANDS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    write = not args.no_write
    figures: list[Figure] = []
    started = time.monotonic()
    for name in selected:
        figures += run_in_process(name, write) if name in IN_PROCESS else run_subprocess(name, write)
    summary = table(figures)
    print("\n" + summary)
    if write:
        from bench.relay import machine

        command = "python -m bench" + ("" if selected == list(COMMANDS) else f" --only {','.join(selected)}")
        runs = f"`{command}` ({(time.monotonic() - started) / 60:.0f} min, {time.strftime('%Y-%m-%d %H:%M')})"
        previous = section_text("Summary")
        if selected != list(COMMANDS) and previous:
            # A partial run replaces its benchmarks' rows and keeps the others, in suite order.
            kept = [row for row in previous.splitlines() if row.startswith("| ") and row.split(" | ")[0][2:] in set(COMMANDS) - set(selected)]
            rows = kept + summary.splitlines()[2:]
            summary = "\n".join(summary.splitlines()[:2] + sorted(rows, key=lambda row: list(COMMANDS).index(row.split(" | ")[0][2:])))
            earlier = re.search(r"^Commands?: (.*?)\. Machine", previous, re.M)
            runs = (earlier[1] + "; then " if earlier else "") + runs
        section = f"""## Summary

Commands: {runs}. Machine: {machine()}.

Each figure next to its target; the sections below give each benchmark's method, its full
table and the spread (medians, min–max). The benchmarks run one after the other with these
commands: {'; '.join(f"`{' '.join(c)}`" for c in COMMANDS.values())}.

{summary}
"""
        replace_section("Summary", section)
    if any(f.met is False for f in figures):
        sys.exit(1)


if __name__ == "__main__":
    main()
