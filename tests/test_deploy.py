"""deploy/: the Pi setup script (dry run, refusals), the systemd units and logrotate.

Nothing here touches the system: setup_pi.sh runs only with --dry-run and every path
pointed under tmp_path; the units are checked with `systemd-analyze verify` on copies
whose paths point under tmp_path; logrotate runs on a copy with its own state file.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daedalus.config import SupervisorConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "setup_pi.sh"
UNITS = ("daedalus.service", "daedalus-health.service", "daedalus-health.timer")
DAEDALUS = Path(sys.executable).with_name("daedalus")

# a Pi 4 with 1 GB and no swap: the swap and memory-limit advice must show
SMALL_PI = "MemTotal:        944268 kB\nMemFree:         500000 kB\nSwapTotal:             0 kB\n"


def paths(tmp_path: Path) -> dict[str, Path]:
    return {name: tmp_path / name for name in ("opt", "etc", "state", "systemd", "logrotate.d")}


def setup_sh(tmp_path: Path, *args: str, arch: tuple[str, str, str] = ("aarch64", "64", "arm64"),
             python: str | None = None, python_realpath: str = "/usr/bin/python3.11",
             ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """setup_pi.sh --dry-run with every path under tmp_path and the architecture given. The
    test's Python may live under /root or /home (pyenv), which the script refuses for the
    service: it is told the interpreter is the system's unless a test says otherwise."""
    p = paths(tmp_path)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(SMALL_PI)
    env = dict(os.environ, DAEDALUS_SETUP_MACHINE=arch[0], DAEDALUS_SETUP_LONG_BIT=arch[1],
               DAEDALUS_SETUP_DPKG_ARCH=arch[2], DAEDALUS_SETUP_MEMINFO=str(meminfo),
               DAEDALUS_SETUP_PYTHON_REALPATH=python_realpath)  # fmt: skip
    cmd = ["bash", str(SCRIPT), "--dry-run", "--python", python or sys.executable, "--prefix", str(p["opt"]),
           "--config-dir", str(p["etc"]), "--state-dir", str(p["state"]), "--systemd-dir", str(p["systemd"]),
           "--logrotate-dir", str(p["logrotate.d"]), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def render(text: str, tmp_path: Path) -> str:
    """What setup_pi.sh writes for the paths of setup_sh()."""
    p = paths(tmp_path)
    return (text.replace("/opt/daedalus", str(p["opt"])).replace("/etc/daedalus", str(p["etc"]))
            .replace("/var/lib/daedalus", str(p["state"])))  # fmt: skip


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (keys may repeat, unlike configparser's)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def one(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in sections[section] if k == key]
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


# --- setup_pi.sh -----------------------------------------------------------------------


def test_dry_run_prints_every_action_and_changes_nothing(tmp_path: Path) -> None:
    result = setup_sh(tmp_path)
    assert result.returncode == 0, result.stderr
    out, p = result.stdout, paths(tmp_path)
    for expected in [
        "architecture: aarch64, 64-bit userland (arm64): ok",
        f"python: {'.'.join(map(str, sys.version_info[:3]))} at {sys.executable} (64-bit): ok",
        f"+ install -d -m 0750 -o daedalus -g daedalus {p['state']} {p['state']}/data {p['state']}/logs",
        f"+ mkdir -p {p['opt']}/src.new\n+ touch {p['opt']}/src.new/.installed-by-setup_pi\n",
        f"+ tar -C {ROOT} -cf - . | tar -C {p['opt']}/src.new --no-same-owner -xf -",
        f"+ mv {p['opt']}/src.new {p['opt']}/src\n",
        f"+ {sys.executable} -m venv {p['opt']}/.venv",
        f"+ {p['opt']}/.venv/bin/pip install --disable-pip-version-check --no-cache-dir {p['opt']}/src\n",
        f"+ {p['opt']}/.venv/bin/python -m compileall -q -j 0 {p['opt']}/.venv/lib >/dev/null\n",
        f"+ render deploy/config.yaml > {p['etc']}/config.yaml (mode 0640, owner root:daedalus)",
        f"+ runuser -u daedalus -- {p['opt']}/.venv/bin/daedalus config check {p['etc']}/config.yaml",
        *(f"+ render deploy/{unit} > {p['systemd']}/{unit} (mode 0644" for unit in UNITS),
        f"+ render deploy/logrotate/daedalus > {p['logrotate.d']}/daedalus (mode 0644",
        "+ systemctl daemon-reload",
        "+ systemctl enable daedalus.service daedalus-health.timer",
        "+ systemctl restart daedalus.service",
        "+ systemctl restart daedalus-health.timer",
        "memory: 922 MB RAM, 0 MB swap",
        "CONF_SWAPSIZE=1024",
        "MemoryHigh=1200M MemoryMax=1500M",
        "With 922 MB, capture and the ETL's peaks hardly fit",
        "status page: http://127.0.0.1:8787/",
        f"daedalus status --config {p['etc']}/config.yaml",
    ]:
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert "+ useradd --system" in out or "user daedalus exists" in out
    assert "/opt/daedalus" not in out and "/etc/systemd/system" not in out
    assert sorted(x.name for x in tmp_path.iterdir()) == ["meminfo"]  # nothing created


def test_dry_run_is_stable_and_sees_what_is_installed(tmp_path: Path) -> None:
    """The same state gives the same plan; installed files that match are left alone."""
    first, second = setup_sh(tmp_path), setup_sh(tmp_path)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout

    p = paths(tmp_path)
    p["systemd"].mkdir()
    (p["systemd"] / "daedalus.service").write_text(render((DEPLOY / "daedalus.service").read_text(), tmp_path))
    (p["systemd"] / "daedalus-health.timer").write_text("stale\n")
    p["etc"].mkdir()
    (p["etc"] / "config.yaml").write_text("data_dir: /somewhere/else\n")
    out = setup_sh(tmp_path, "--no-start").stdout
    assert f"unchanged: {p['systemd']}/daedalus.service" in out
    assert f"+ render deploy/daedalus-health.timer > {p['systemd']}/daedalus-health.timer" in out
    assert f"keeping {p['etc']}/config.yaml" in out and "render deploy/config.yaml" not in out
    assert "systemctl restart" not in out and "not started (--no-start)" in out
    assert (p["etc"] / "config.yaml").read_text() == "data_dir: /somewhere/else\n"


@pytest.mark.parametrize(
    ("arch", "reason"),
    [
        (("armv7l", "32", "armhf"), "a 32-bit kernel (armv7l)"),
        (("armv6l", "32", "armhf"), "a 32-bit kernel (armv6l)"),
        (("i686", "32", "i386"), "a 32-bit kernel (i686)"),
        (("aarch64", "32", "armhf"), "a 32-bit userland (getconf LONG_BIT = 32) on a aarch64 kernel"),
        (("aarch64", "64", "armhf"), "a 32-bit userland (dpkg architecture armhf) on a aarch64 kernel"),
    ],
)
def test_refuses_a_32_bit_system_with_the_reason(tmp_path: Path, arch: tuple[str, str, str], reason: str) -> None:
    result = setup_sh(tmp_path, arch=arch)
    assert result.returncode == 2
    assert f"refusing to install on {reason}" in result.stderr
    assert "pyarrow, DuckDB, Polars and numba publish no 32-bit ARM wheels" in result.stderr
    assert "Raspberry Pi OS (64-bit)" in result.stderr
    assert "+ " not in result.stdout


def test_refuses_python_older_than_3_11(tmp_path: Path) -> None:
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\necho 3.10.12\n")  # answers the script's version probe as 3.10 would
    old.chmod(0o755)
    result = setup_sh(tmp_path, python=str(old))
    assert result.returncode == 2
    assert f"Python 3.11 or newer is needed (found: 3.10.12 at {old})" in result.stderr
    assert "--python PATH" in result.stderr and "python3-venv" in result.stderr
    assert "+ " not in result.stdout


@pytest.mark.parametrize(
    ("option", "path", "why"),
    [
        ("--prefix", "/home/pi/daedalus", "ProtectHome=yes hides /home"),
        ("--state-dir", "/root/daedalus", "ProtectHome=yes hides /home"),
        ("--config-dir", "/run/user/1000/daedalus", "ProtectHome=yes hides /home"),
        ("--prefix", "/", "not / or a top-level directory"),
        ("--state-dir", "/var", "not / or a top-level directory"),
    ],
)
def test_refuses_paths_the_unit_cannot_use(tmp_path: Path, option: str, path: str, why: str) -> None:
    """ProtectHome=yes would hide them from the service; / or /var would be written into."""
    result = setup_sh(tmp_path, option, path)
    assert result.returncode == 2
    assert f"{option} {path}: " in result.stderr and why in result.stderr
    assert "+ " not in result.stdout


def test_refuses_a_python_the_unit_cannot_see(tmp_path: Path) -> None:
    """A pyenv or uv Python under /root or /home: the venv's python links to it and
    ProtectHome=yes hides it, so the service would fail with status=203/EXEC."""
    result = setup_sh(tmp_path, python_realpath="/home/pi/.pyenv/versions/3.11.9/bin/python3.11")
    assert result.returncode == 2
    assert "is /home/pi/.pyenv/versions/3.11.9/bin/python3.11, under /home" in result.stderr
    assert "UV_PYTHON_INSTALL_DIR=/opt/python" in result.stderr


def test_upgrade_swaps_only_its_own_copy(tmp_path: Path) -> None:
    """A re-run renames the old copy away before renaming the new one in; a directory the
    script did not make (no marker) is never deleted, nor a .venv that is not a venv."""
    src = paths(tmp_path)["opt"] / "src"
    src.mkdir(parents=True)
    (src / "precious.txt").write_text("mine\n")
    result = setup_sh(tmp_path)
    assert result.returncode == 2 and f"{src} exists but was not made by setup_pi.sh" in result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith("+ ")]  # before any action

    (src / ".installed-by-setup_pi").touch()
    out = setup_sh(tmp_path).stdout
    swap = f"+ mv {src} {src}.old\n+ mv {src}.new {src}\n+ rm -rf {src}.old\n"
    assert swap in out, out
    assert out.index("| tar -C") < out.index(swap)

    (src.parent / ".venv").mkdir()  # not a venv: no pyvenv.cfg, no bin/python
    result = setup_sh(tmp_path)
    assert result.returncode == 2 and "exists and is not a venv" in result.stderr
    assert (src / "precious.txt").read_text() == "mine\n"


def test_warns_when_the_config_writes_outside_the_state_dir(tmp_path: Path) -> None:
    """The unit may write only under the state directory (ReadWritePaths): a data_dir moved
    to an SSD needs a drop-in, which the script says. Read with the installed package."""
    p = paths(tmp_path)
    python = p["opt"] / ".venv" / "bin" / "python"  # an installed venv, as far as the script can tell
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (p["opt"] / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    p["etc"].mkdir()
    (p["etc"] / "config.yaml").write_text(
        f"data_dir: /mnt/ssd/daedalus\nsupervisor: {{log_dir: {p['state']}/logs, status_port: 9999}}\n")  # fmt: skip
    result = setup_sh(tmp_path, "--no-start")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stdout
    assert "/mnt/ssd/daedalus (in" in warnings[0] and "ReadWritePaths=/mnt/ssd/daedalus" in warnings[0]
    assert "status page: http://127.0.0.1:9999/" in result.stdout  # the same reader


def test_bad_option_and_non_root_without_dry_run(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown option: --frobnicate" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--prefix", "relative/dir"], capture_output=True, text=True)
    assert result.returncode == 2 and "--prefix needs an absolute path" in result.stderr


@pytest.mark.parametrize("script", [SCRIPT, DEPLOY / "pi-check.sh"], ids=lambda p: p.name)
def test_script_syntax_and_shellcheck(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt install shellcheck)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_pi_check_help_and_bad_argument_do_nothing() -> None:
    """Arguments are read before anything is installed, downloaded or cached."""
    script = str(DEPLOY / "pi-check.sh")
    result = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--clean" in result.stdout and "make pi-check" in result.stdout
    result = subprocess.run(["bash", script, "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown argument --frobnicate" in result.stderr
    assert "=== pi-check" not in result.stdout


# --- the units -------------------------------------------------------------------------


def test_supervisor_unit_has_what_the_issue_requires() -> None:
    unit = unit_entries(DEPLOY / "daedalus.service")
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    expected = {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "always",
                "RestartSec": "5", "KillMode": "mixed", "OOMPolicy": "continue", "User": "daedalus",
                "Group": "daedalus", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
                "ReadWritePaths": "/var/lib/daedalus", "WorkingDirectory": "/var/lib/daedalus",
                "ExecStart": "/opt/daedalus/.venv/bin/daedalus run --config /etc/daedalus/config.yaml"}  # fmt: skip
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    for key in ("MemoryHigh", "MemoryMax", "Nice", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality",
                "RestrictRealtime", "SystemCallArchitectures"):  # fmt: skip
        one(unit, "Service", key)
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "MemoryDenyWriteExecute" not in {k for k, _ in unit["Service"]}  # numba's JIT writes code
    # stopping waits for the slowest child's shutdown timeout before SIGKILL
    defaults = SupervisorConfig()
    slowest = max(defaults.shutdown_timeout(kind) for kind in ("ingest", "etl", "sync"))
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > slowest
    env = dict(v.split("=", 1) for k, v in unit["Service"] if k == "Environment")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["NUMBA_CACHE_DIR"].startswith("/var/lib/daedalus/")  # writable under ProtectSystem=strict


def test_config_template_fits_the_unit() -> None:
    """The template loads, and everything the service writes is under ReadWritePaths."""
    cfg = load_config(DEPLOY / "config.yaml")
    assert cfg.data_dir == Path("/var/lib/daedalus/data")
    assert cfg.log_dir.is_relative_to("/var/lib/daedalus")
    assert cfg.supervisor.status_host == "127.0.0.1" and cfg.ingestion.raw_compression == "zstd"
    assert cfg.coinbase.product_ids == ["BTC-USD", "ETH-USD"]
    assert not cfg.coinbase.api_key.get_secret_value()


def test_health_timer_and_logrotate_agree() -> None:
    service = unit_entries(DEPLOY / "daedalus-health.service")
    timer = unit_entries(DEPLOY / "daedalus-health.timer")
    assert one(service, "Service", "Type") == "oneshot"
    assert one(service, "Service", "SuccessExitStatus") == "1"  # a warning does not fail the unit
    assert "daedalus health --config /etc/daedalus/config.yaml" in one(service, "Service", "ExecStart")
    assert seconds(one(timer, "Timer", "OnUnitActiveSec")) == 300
    assert one(timer, "Install", "WantedBy") == "timers.target"
    rules = [line.strip() for line in (DEPLOY / "logrotate" / "daedalus").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    assert rules[0] == "/var/lib/daedalus/logs/health.log {"  # only the file nobody else rotates
    assert "copytruncate" not in rules
    assert "tee -a /var/lib/daedalus/logs/health.log" in one(service, "Service", "ExecStart")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists: point the prefix at a tree under tmp_path
    fake = tmp_path / "opt" / ".venv" / "bin" / "daedalus"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        (units / name).write_text(render((DEPLOY / name).read_text(), tmp_path))
    result = subprocess.run([tool, "verify", *(str(units / n) for n in UNITS)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    mentioned = [line for line in (result.stdout + result.stderr).splitlines() if "daedalus" in line]
    assert not mentioned, mentioned


def test_health_unit_command_logs_the_report_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """The unit's ExecStart, run for real: the report lands in health.log after a UTC time
    line, and the exit code is daedalus health's (0/1/2), not tee's."""
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    (tmp_path / "state" / "logs").mkdir(parents=True)
    exec_start = one(unit_entries(DEPLOY / "daedalus-health.service"), "Service", "ExecStart")
    command = (render(exec_start, tmp_path).replace("%%", "%")
               .replace(f"{paths(tmp_path)['opt']}/.venv/bin/daedalus", str(DAEDALUS))
               .replace(f"{paths(tmp_path)['etc']}/config.yaml", str(config)))  # fmt: skip
    direct = subprocess.run([str(DAEDALUS), "health", "--config", str(config)], capture_output=True, text=True)
    assert direct.returncode in (1, 2), direct.stdout  # an empty data dir with no supervisor is not ok
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
    assert result.returncode == direct.returncode
    log = (tmp_path / "state" / "logs" / "health.log").read_text()
    assert log.startswith("== 20") and log.splitlines()[0].endswith("Z")
    assert "health: " in log and log == result.stdout


def test_logrotate_rotates_health_log_only(tmp_path: Path) -> None:
    tool = shutil.which("logrotate")
    if tool is None:
        pytest.skip("logrotate is not installed")
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    for name in ("health.log", "etl.log", "etl.log.1", "ingest-coinbase.log"):
        (logs / name).write_text(f"{name}\n" * 100)
    user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    conf = tmp_path / "daedalus.logrotate"
    conf.write_text(render((DEPLOY / "logrotate" / "daedalus").read_text(), tmp_path)
                    .replace("daedalus daedalus", f"{user} {group}"))  # fmt: skip
    subprocess.run([tool, "--force", "--state", str(tmp_path / "state.txt"), str(conf)], check=True, timeout=60)
    assert sorted(x.name for x in logs.iterdir()) == sorted(
        ["health.log", "health.log.1", "etl.log", "etl.log.1", "ingest-coinbase.log"])  # fmt: skip
    assert (logs / "health.log").read_text() == ""  # recreated empty; the next run appends
    assert (logs / "etl.log.1").read_text() == "etl.log.1\n" * 100  # the supervisor's files untouched


# --- make pi-check's harness ---------------------------------------------------------------


def test_pi_check_smoke_harness_natively_on_the_synthetic_market(tmp_path: Path) -> None:
    """deploy/pi-check/smoke.py's whole flow (sim -> ingest -> etl twice -> DuckDB/Polars
    read-back -> compare) with every step native and no recording, as on a fresh clone
    (the emulated run itself is `make pi-check`, minutes long and not part of the tests)."""
    summary = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(DEPLOY / "pi-check" / "smoke.py"), "--native", "--cache",
                             str(tmp_path), "--summary", str(summary)], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no recording: the simulator's synthetic market" in result.stdout
    assert "compare: final best bid/ask equal to native" in result.stdout
    facts = json.loads(summary.read_text())
    assert facts["frames"] >= 600 and facts["segments"] >= 1
    assert set(facts["final_bbo"]) == {"BTC-USD", "ETH-USD"}
    assert facts["rows"]["level2"] > 0 and facts["rows"]["market_trades"] > 0
    assert [f["step"] for f in facts["figures"]][-2:] == [
        "read-back DuckDB+Polars (native stand-in)", "read-back DuckDB+Polars (native)"]  # fmt: skip
