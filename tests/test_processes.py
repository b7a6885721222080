"""Compute threads shared between finetrack processes: the sizing rule, and the registry under real processes
(a live one counts, a killed one is ignored and removed, a user's OMP_NUM_THREADS wins). No timing asserts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from finetrack import processes


def test_each_process_gets_an_equal_share_of_the_cores_and_at_least_one():
    assert processes.threads_for(2, 1) == 2
    assert processes.threads_for(2, 2) == 1
    assert processes.threads_for(2, 5) == 1  # never zero
    assert processes.threads_for(16, 3) == 5
    assert processes.threads_for(8, 0) == 8  # an empty registry (it could not be written) means alone
    assert processes.usable_cores() == len(os.sched_getaffinity(0))


REGISTERED = textwrap.dedent(
    """
    import sys, time
    from finetrack import processes
    processes.register()
    print("registered", flush=True)
    time.sleep(120)
    """
)


def _start_registered(env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", REGISTERED], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "registered"
    return proc


def test_registry_counts_live_processes_and_forgets_killed_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETRACK_RUNTIME_DIR", str(tmp_path))
    env = {**os.environ}
    first, second = _start_registered(env), _start_registered(env)
    try:
        folder = processes.registry_dir()
        assert processes.live_processes() == sorted([first.pid, second.pid])
        first.send_signal(signal.SIGKILL)  # kill -9: no atexit, its entry stays behind
        first.wait(timeout=30)
        assert (folder / str(first.pid)).exists()
        assert processes.live_processes() == [second.pid]
        assert not (folder / str(first.pid)).exists()  # removed by the first look after it died
        # a live pid whose start time differs is a reused pid, not a finetrack process
        (folder / str(os.getppid())).write_text("1")
        assert processes.live_processes() == [second.pid]
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait(timeout=30)
    second_entry = processes.registry_dir() / str(second.pid)
    assert processes.live_processes() == [] and not second_entry.exists()


CONFIGURE = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import torch
    from finetrack import processes
    print("set", processes.configure_threads(), "torch", torch.get_num_threads(), flush=True)
    """
)


def test_a_second_process_takes_its_share_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETRACK_RUNTIME_DIR", str(tmp_path))
    for name in processes.USER_THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    cores = processes.usable_cores()
    alone = subprocess.run([sys.executable, "-c", CONFIGURE], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert alone.stdout.splitlines()[-1] == f"set {cores} torch {cores}", alone.stdout + alone.stderr
    assert "share" not in alone.stdout

    other = _start_registered({**os.environ})
    try:
        shared = subprocess.run([sys.executable, "-c", CONFIGURE], capture_output=True, text=True, timeout=120, env={**os.environ})
    finally:
        other.kill()
        other.wait(timeout=30)
    threads = max(1, cores // 2)
    assert f"2 finetrack processes share {cores} cores: using {threads} thread" in shared.stdout, shared.stdout + shared.stderr
    assert shared.stdout.splitlines()[-1] == f"set {threads} torch {threads}"
    assert processes.live_processes() == []


@pytest.mark.parametrize("variable", processes.USER_THREAD_VARS)
def test_a_thread_count_the_user_set_wins(tmp_path, monkeypatch, variable):
    monkeypatch.setenv("FINETRACK_RUNTIME_DIR", str(tmp_path))
    other = _start_registered({**os.environ})
    try:
        r = subprocess.run(
            [sys.executable, "-c", CONFIGURE], capture_output=True, text=True, timeout=120, env={**os.environ, variable: "1"}
        )
    finally:
        other.kill()
        other.wait(timeout=30)
    assert r.stdout.splitlines()[-1] == "set None torch 1", r.stdout + r.stderr
    assert "share" not in r.stdout


def test_rebalance_follows_processes_starting_and_ending(tmp_path, monkeypatch):
    """The process that started first (training) drops to its share when a second one (an eval --watch) appears."""
    monkeypatch.setenv("FINETRACK_RUNTIME_DIR", str(tmp_path))
    for name in processes.USER_THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    script = textwrap.dedent(
        """
        import sys, time
        from finetrack import processes
        processes.configure_threads()
        print("first", processes.rebalance(force=True), flush=True)
        sys.stdin.readline()  # the test starts a second process meanwhile
        print("second", processes.rebalance(force=True), flush=True)
        sys.stdin.readline()
        print("third", processes.rebalance(force=True), flush=True)
        """
    )
    cores = processes.usable_cores()
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert proc.stdout.readline().split() == ["first", str(cores)]
        other = _start_registered({**os.environ})
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["second", str(max(1, cores // 2))]
        other.kill()
        other.wait(timeout=30)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["third", str(cores)]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_descendants_include_workers_in_sessions_of_their_own():
    """What smoke kills: a launcher's workers, which torch's launcher starts in new sessions (killpg misses them)."""
    import time

    from finetrack.processes import descendants

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], start_new_session=True); time.sleep(30)"
    launcher = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        found: list[int] = []
        for _ in range(100):  # the worker starts a moment after the launcher
            found = descendants(launcher.pid)
            if found:
                break
            time.sleep(0.05)
        assert len(found) == 1
        assert os.getsid(found[0]) != os.getsid(launcher.pid)  # in a session of its own: killpg of the launcher misses it
        assert descendants(found[0]) == [] and launcher.pid in descendants(os.getpid())
    finally:
        for pid in [*descendants(launcher.pid), launcher.pid]:
            os.kill(pid, 9)
        launcher.wait()
