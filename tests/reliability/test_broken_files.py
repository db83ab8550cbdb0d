"""Broken configuration and tariff files: clear lines naming file and key, no traceback.

Starting from the working collector configuration, tariff and agent configuration the
other scenarios use, each case breaks one line: a value of the wrong type, a float
(which already lost precision), a negative or empty value, odd unicode, an unknown
key, a missing key, or TOML that does not parse. The real daemons are started on the
broken files (``meterd collector run``, ``meterd agent run``); ``meterd tariff check``
and ``meterd collector check-config`` read the broken tariff. Each must either start
normally (the change was harmless: then it is stopped with SIGTERM and must exit 0) or
exit 1 with one line per problem on stderr, the first ``meterd: error: <file>: ...``,
every one naming the file and, for a bad value or an unknown key, one naming the key
(or, for a value that is a path, the path it names); never a traceback, never another
exit code.

Which lines are broken and how is drawn from the seed; ``METERD_SOAK=1`` tries every
line with every kind of damage.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ROOT
from tests.ledger.helpers import TARIFF
from tests.reliability.faults import SOAK, AgentProcess, collector_config, free_port

LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>.+)$")
SECTION = re.compile(r"^\s*\[\[?(?P<name>[^\]]+)\]\]?\s*$")
DAMAGE = ("wrong type", "float", "negative", "empty", "unicode", "unknown key", "missing",
          "bad toml")
VALUE_DAMAGE = {"wrong type", "float", "negative", "empty", "unicode"}
CASES = 0 if SOAK else 3  # per file kind; 0: every line with every damage


@dataclass(frozen=True)
class Case:
    line: int  # index of the damaged line
    key: str
    section: str
    damage: str

    def __str__(self) -> str:
        where = f"{self.section}.{self.key}" if self.section else self.key
        return f"{where}: {self.damage}"


def candidates(text: str) -> list[Case]:
    cases = []
    section = ""
    for i, line in enumerate(text.splitlines()):
        if m := SECTION.match(line):
            section = m["name"].strip()
        elif m := LINE.match(line):
            cases += [Case(i, m["key"], section, d) for d in DAMAGE]
    return cases


def damaged(text: str, case: Case) -> str:
    lines = text.splitlines()
    m = LINE.match(lines[case.line])
    assert m is not None
    value = m["value"].strip()
    prefix = f"{m['indent']}{case.key} = "
    if case.damage == "wrong type":
        replacement = "42" if value.startswith(('"', "[", "{")) else '"forty-two"'
        lines[case.line] = prefix + replacement
    elif case.damage == "float":
        lines[case.line] = prefix + "0.1"
    elif case.damage == "negative":
        lines[case.line] = prefix + ("-5" if value.lstrip("-").isdigit() else '"-5"')
    elif case.damage == "empty":
        lines[case.line] = prefix + ('""' if value.startswith('"') else "[]")
    elif case.damage == "unicode":
        lines[case.line] = prefix + '"🧾\\u202e\\u0301x"'
    elif case.damage == "unknown key":
        lines.insert(case.line + 1, f"{m['indent']}zz_unknown_key = 1")
    elif case.damage == "missing":
        del lines[case.line]
    else:
        lines[case.line] = prefix + value[: max(1, len(value) // 2)] + " = ="
    return "\n".join(lines) + "\n"


def pick(cases: Sequence[Case], rng: random.Random) -> list[Case]:
    if not CASES:
        return list(cases)
    return rng.sample(list(cases), min(CASES, len(cases)))


@dataclass(frozen=True)
class Outcome:
    case: Case
    started: bool
    code: int
    stderr: str


def run_daemon(args: list[str], workdir: Path, case: Case, ready: Callable[[str], bool]
               ) -> Outcome:
    """Start a daemon on the broken files: it fails at once, or it comes up (``ready``
    says so from its stderr and files), and is then stopped with SIGTERM."""
    log = workdir / f"stderr-{args[0]}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", *args], cwd=workdir,
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    started = False
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(log.read_text(errors="replace")):
                started = True
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Outcome(case, started, code, log.read_text(errors="replace"))


def check(outcome: Outcome, job: Job) -> str:
    """The verdict on one case: '' when it is right, else what is wrong."""
    case = outcome.case
    if "Traceback" in outcome.stderr:
        return f"{case}: traceback\n{outcome.stderr[-3000:]}"
    if outcome.started:
        return "" if outcome.code == 0 else f"{case}: exit {outcome.code} on SIGTERM"
    if outcome.code == 0 and not outcome.stderr.strip():  # a check that found nothing wrong
        return ""
    if outcome.code != 1:
        return f"{case}: exit code {outcome.code}\n{outcome.stderr[-2000:]}"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if job.lists_problems and lines and re.fullmatch(r"meterd: \d+ problems?", lines[-1]):
        lines = lines[:-1]  # `meterd tariff check`: every problem, then how many
    if not lines or not lines[0].startswith("meterd: error: "):
        return f"{case}: no error line\n{outcome.stderr[-2000:]}"
    # One line per problem: a file with several lists them, each naming the file.
    for line in lines[1:]:
        if not line.removeprefix("meterd: error: ").startswith(str(job.damaged)):
            return f"{case}: a line that names no file: {line!r}"
    if case.damage == "bad toml":
        if f"{job.damaged}: not valid TOML" not in lines[0]:
            return f"{case}: file not named: {lines[0]!r}"
    elif case.damage in VALUE_DAMAGE | {"unknown key"}:
        key = "zz_unknown_key" if case.damage == "unknown key" else case.key
        # The configuration file and the key; or, for a value that is a path, the path
        # it names (which is where the problem then is).
        if not any(f"{job.damaged}: " in line and re.search(rf"\b{key}\b", line)
                   for line in lines) and str(job.workdir) not in lines[0]:
            return f"{case}: file and key {key!r} not named: {lines!r}"
    elif str(job.workdir) not in lines[0]:
        return f"{case}: no file named: {lines[0]!r}"
    return ""


@dataclass(frozen=True)
class Job:
    args: list[str]
    workdir: Path
    case: Case
    ready: Callable[[str], bool]
    damaged: Path
    lists_problems: bool = False


def run_all(jobs: Sequence[Job]) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(lambda j: run_daemon(j.args, j.workdir, j.case, j.ready), jobs))
    judge(outcomes, jobs)


def judge(outcomes: Sequence[Outcome], jobs: Sequence[Job]) -> None:
    problems = [p for o, j in zip(outcomes, jobs, strict=True) if (p := check(o, j))]
    refused = sum(1 for o in outcomes if not o.started)
    print(f"{len(outcomes)} broken files: {refused} refused with one line, "
          f"{len(outcomes) - refused} harmless")
    for o in outcomes:
        shown = (o.stderr.strip().splitlines()[-1:] if not o.started and o.code
                 else ["(accepted)"])
        print(f"  {o.case}: {shown[0][:160] if shown else ''}")
    assert not problems, "\n".join(problems)


def collector_ready(workdir: Path) -> Callable[[str], bool]:
    return lambda _: (workdir / "ready.json").exists()


def never(_: str) -> bool:
    return False  # a command that runs to its end


def test_broken_collector_configuration_and_tariff(
    tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    template_dir = tmp_path / "template"
    template_dir.mkdir()
    collector_text = collector_config(template_dir, rel_pki, 0, assignments={
        "host-a": "acme", "host-b": "globex"}).read_text()
    config_cases = pick(candidates(collector_text), rng)
    tariff_cases = pick(candidates(TARIFF), rng)

    jobs = []
    for n, case in enumerate(config_cases):
        d = tmp_path / f"config-{n}"
        d.mkdir()
        path = collector_config(d, rel_pki, free_port(), assignments={})
        path.write_text(damaged(collector_text, case))
        jobs.append(Job(["collector", "run", "--config", str(path), "--ready-file",
                         str(d / "ready.json")], d, case, collector_ready(d), path))
    for n, case in enumerate(tariff_cases):
        d = tmp_path / f"tariff-{n}"
        d.mkdir()
        path = collector_config(d, rel_pki, free_port(), assignments={"host-a": "acme"})
        tariff = d / "tariff.toml"
        tariff.write_text(damaged(TARIFF, case))
        # The check command reads the tariff on its own; the collector reads it with
        # its configuration (the same loader at start, on SIGHUP and here).
        jobs.append(Job(["tariff", "check", str(tariff)], d, case, never, tariff,
                        lists_problems=True))
        if n < 2 or SOAK:
            jobs.append(Job(["collector", "check-config", "--config", str(path)], d, case,
                            never, tariff))
    run_all(jobs)


def test_broken_agent_configuration(tmp_path: Path, rel_pki: Path, rng: random.Random) -> None:
    template = AgentProcess(tmp_path / "template", rel_pki, "host-a", free_port(), rng)
    # Stopping a healthy agent with SIGTERM ships for final_flush_seconds: keep it short.
    text = template.config.read_text().replace('final_flush_seconds = "10"',
                                               'final_flush_seconds = "0.1"')
    cases = pick(candidates(text), rng)[: 4 if CASES else None]
    jobs = []
    for n, case in enumerate(cases):
        d = tmp_path / f"agent-{n}"
        d.mkdir()
        path = d / "agent.toml"
        path.write_text(damaged(text, case))
        jobs.append(Job(["agent", "run", "--config", str(path)], d, case,
                        lambda err: '"agent_started"' in err, path))
    run_all(jobs)


def test_an_empty_spool_path_is_named(tmp_path: Path, rel_pki: Path, rng: random.Random) -> None:
    template = AgentProcess(tmp_path / "template", rel_pki, "host-a", free_port(), rng)
    text = template.config.read_text()
    case = next(c for c in candidates(text) if (c.key, c.damage) == ("spool_path", "empty"))
    d = tmp_path / "agent"
    d.mkdir()
    path = d / "agent.toml"
    path.write_text(damaged(text, case))
    run_all([Job(["agent", "run", "--config", str(path)], d, case,
                 lambda err: '"agent_started"' in err, path)])
