"""The Ray a job starts for itself is private: every one of its processes listens on loopback
only, and a process without its token cannot run a task in it, while one with the token can
(so the refusal is the token's doing, not a broken connection). Plus the token file's rules."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.errors import ConfigError
from tests.conftest import ROOT

# The job's own Ray, started by the function every job uses (tests/test_architecture.py: no
# ray.init outside it); it prints its GCS address and token file, then holds until killed.
HOLDER = """
import os, sys, time
import ray
from engine.distributed.runtime import ray_session
with ray_session(num_cpus=1, dashboard=True, log_to_driver=False):
    print("GCS", ray.get_runtime_context().gcs_address, os.environ.get("RAY_AUTH_TOKEN_PATH", "-"), flush=True)
    time.sleep(600)
"""

CLIENT = """
import ray
ray.init(address=%r, log_to_driver=False)
print("RAN", ray.get(ray.remote(lambda: 6 * 7).remote()), flush=True)
"""


def _descendants(root: int):
    """``root`` and every process below it (Linux /proc)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def _listening(pids):
    """(pid, local address, port) of every TCP socket the processes listen on."""
    listen_inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                addr, port = f[1].rsplit(":", 1)
                listen_inodes[f[9]] = (addr, int(port, 16))
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listen_inodes:
                found.append((pid, *listen_inodes[target[8:-1]]))
    return found


def _is_loopback(hex_addr: str) -> bool:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order)."""
    import ipaddress

    raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    ip = ipaddress.ip_address(raw)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _client(address, env_extra, home, timeout=12):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **env_extra)
    try:
        r = subprocess.run(["timeout", str(timeout), sys.executable, "-c", CLIENT % address], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        return "", "timeout"
    return r.stdout, r.stderr


@pytest.mark.ray
def test_a_jobs_own_ray_is_loopback_only_and_needs_its_token(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="wpr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                              "RAY_AUTH_TOKEN_PATH")}
    env.update(WINNOW_RAY_TMPDIR=temp_dir, RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.time() + 120
        while not line.startswith("GCS") and time.time() < deadline and holder.poll() is None:
            line = holder.stdout.readline()
        assert line.startswith("GCS"), f"the job's Ray did not start: {line}{holder.stdout.read() if holder.poll() is not None else ''}"
        _, address, token_path = line.split()
        assert address.startswith("127.0.0.1:"), address
        assert Path(token_path) == tmp_path / ".cache" / "winnow" / "ray" / "auth_token"
        assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600

        time.sleep(2)  # the dashboard's agents come up after ray.init returns
        sockets = _listening(_descendants(holder.pid))
        assert len(sockets) >= 3, sockets  # GCS, raylet, dashboard at least: the scan itself works
        exposed = [(pid, Path(f"/proc/{pid}/comm").read_text().strip(), addr, port)
                   for pid, addr, port in sockets if not _is_loopback(addr)]
        assert not exposed, f"listening beyond loopback: {exposed}"

        out, err = _client(address, {}, tmp_path)  # no token at all
        assert "RAN" not in out
        assert "InvalidAuthToken" in err or "uthentication" in err, err[-2000:]
        (tmp_path / "wrong").write_text("0" * 64)
        out, err = _client(address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")},
                           tmp_path)
        assert "RAN" not in out
        assert "InvalidAuthToken" in err or "uthentication" in err, err[-2000:]
        out, err = _client(address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}, tmp_path,
                           timeout=90)
        assert "RAN 42" in out, err[-2000:]
    finally:
        os.killpg(holder.pid, signal.SIGTERM)
        try:
            holder.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(holder.pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def test_loopback_decoding():
    assert _is_loopback("0100007F") and not _is_loopback("00000000") and not _is_loopback("0200000A")
    assert _is_loopback("00000000000000000000000001000000")  # ::1
    assert _is_loopback("0000000000000000FFFF00000100007F")  # ::ffff:127.0.0.1
    assert not _is_loopback("00000000000000000000000000000000")  # ::


def test_token_file_is_created_private_and_reused(tmp_path):
    from engine.distributed.runtime import private_token_path

    d = tmp_path / "rt"
    path = private_token_path(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = Path(path).read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert private_token_path(str(d)) == path and Path(path).read_text() == token


@pytest.mark.parametrize("plant, needle", [
    (lambda d: (d.mkdir(), d.chmod(0o777)), "only this user can write"),
    (lambda d: (d.mkdir(mode=0o700), (d / "auth_token").write_text("x" * 64), (d / "auth_token").chmod(0o644)),
     "only this user can read"),
    (lambda d: (d.mkdir(mode=0o700), (d / "auth_token").write_text(""), (d / "auth_token").chmod(0o600)),
     "non-empty"),
    (lambda d: (d.mkdir(mode=0o700), (d / "auth_token").symlink_to("/etc/hostname")), "only this user can read"),
])
def test_planted_or_readable_token_places_are_refused(tmp_path, plant, needle):
    from engine.distributed.runtime import private_token_path

    d = tmp_path / "rt"
    plant(d)
    with pytest.raises(ConfigError, match=needle):
        private_token_path(str(d))


def test_private_env_is_set_for_the_block_and_restored(tmp_path, monkeypatch):
    from engine.distributed.runtime import private_ray_env

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(k, raising=False)
    from ray._private import ray_constants

    with private_ray_env(str(tmp_path / "rt")) as env:
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert os.environ["RAY_AUTH_TOKEN_PATH"] == env["RAY_AUTH_TOKEN_PATH"]
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER is True
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "mine"))  # the user's own token is kept
    with private_ray_env(str(tmp_path / "rt")) as env:
        assert "RAY_AUTH_TOKEN_PATH" not in env and os.environ["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "mine")
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "mine")


def test_a_private_ray_gets_fast_ray_train_settings_and_the_users_win(monkeypatch):
    """A job's own single-machine Ray polls its Train workers every 0.2 s and starts no
    preemption watcher (bench/overhead.py: 6 s less per run on 2 cores); a value the user set is
    kept, and nothing stays set after the session."""
    import contextlib

    import ray

    from engine.distributed import runtime

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(runtime, "private_ray_env", lambda **kw: contextlib.nullcontext())
    monkeypatch.setattr(runtime, "_init_keeping_signal_handlers",
                        lambda **kw: seen.update({k: os.environ.get(k) for k in runtime.LOCAL_TRAIN_ENV}))
    with runtime.ray_session(dashboard=False):
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert seen == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
