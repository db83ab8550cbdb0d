"""The test harness's processes die with the test run that started them: a run killed
by a timeout leaves no collector behind to take CPU from the next one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from tests.harness import ROOT

STARTER = """
import sys, time
from pathlib import Path
from tests.harness import CollectorProcess, collector_config
collector = CollectorProcess(collector_config(Path(sys.argv[1]), Path(sys.argv[2]))).start()
print(collector.proc.pid, flush=True)
time.sleep(120)
"""


def test_a_collector_started_by_a_killed_test_run_dies_with_it(
    tmp_path: Path, pki_dir: Path
) -> None:
    run = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path), str(pki_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert run.stdout is not None
        collector = psutil.Process(int(run.stdout.readline()))
        assert collector.is_running()
        assert collector.ppid() == run.pid
    finally:
        run.kill()
        run.wait(10)
        if run.stdout is not None:
            run.stdout.close()
    _, alive = psutil.wait_procs([collector], timeout=10)
    for p in alive:
        p.kill()
    assert not alive, "the collector outlived the test run that started it"
