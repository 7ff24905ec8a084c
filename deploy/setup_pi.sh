#!/usr/bin/env bash
# Install Daedalus as a systemd service on a Raspberry Pi (64-bit Raspberry Pi OS bookworm),
# or any 64-bit Debian-like Linux with systemd. Run from a checkout:
#
#   sudo deploy/setup_pi.sh              install or upgrade, then (re)start the service
#   deploy/setup_pi.sh --dry-run         print every action, change nothing (no root needed)
#
# Idempotent: running it again copies the checkout again, reinstalls the package, keeps an
# existing /etc/daedalus/config.yaml, rewrites the units only when they differ, and restarts
# the service (that is the upgrade path). It deletes only what it made itself ($PREFIX/src,
# a broken $PREFIX/.venv); never the state directory (data, logs). Exit 0 done, 1 a step
# failed, 2 refused (32-bit system, Python too old, not root, bad option or path): fix the
# cause and run it again.
#
# Test hooks (used only by tests/test_deploy.py to exercise the refusals on any machine):
#   DAEDALUS_SETUP_MACHINE    instead of `uname -m`
#   DAEDALUS_SETUP_LONG_BIT   instead of `getconf LONG_BIT`
#   DAEDALUS_SETUP_DPKG_ARCH  instead of `dpkg --print-architecture`
#   DAEDALUS_SETUP_MEMINFO    instead of /proc/meminfo (swap advice)
#   DAEDALUS_SETUP_PYTHON_REALPATH  instead of the interpreter's resolved path (ProtectHome check)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
SERVICE_USER=daedalus
# Written into each copy of the checkout: the only $PREFIX/src this script will delete.
MARKER=.installed-by-setup_pi
# The defaults written in the unit files and the config template; render() replaces them.
DEFAULT_PREFIX=/opt/daedalus
DEFAULT_CONFIG_DIR=/etc/daedalus
DEFAULT_STATE_DIR=/var/lib/daedalus

PREFIX=$DEFAULT_PREFIX
CONFIG_DIR=$DEFAULT_CONFIG_DIR
STATE_DIR=$DEFAULT_STATE_DIR
SYSTEMD_DIR=/etc/systemd/system
LOGROTATE_DIR=/etc/logrotate.d
PYTHON=""
DRY_RUN=0
START=1

usage() {
    cat <<EOF
usage: $(basename "$0") [options]
  --dry-run             print every action without doing it (works as any user)
  --no-start            install and enable, but do not (re)start the service now
  --python PATH         the Python (>= 3.11) to build the venv with (default: first of
                        python3.13 python3.12 python3.11 python3 that is new enough)
  --source DIR          the checkout to install (default: $SOURCE_DIR)
  --prefix DIR          code and venv (default: $DEFAULT_PREFIX)
  --config-dir DIR      config.yaml (default: $DEFAULT_CONFIG_DIR)
  --state-dir DIR       data, logs, caches; the daedalus user's home (default: $DEFAULT_STATE_DIR)
  --systemd-dir DIR     unit files (default: $SYSTEMD_DIR)
  --logrotate-dir DIR   logrotate config (default: $LOGROTATE_DIR)
  -h, --help            this text
EOF
}

say() { printf '%s\n' "$*"; }
refuse() { printf 'setup_pi.sh: %s\n' "$*" >&2; exit 2; }

# run CMD...: print it (shell-quoted), then run it unless --dry-run.
run() {
    local quoted
    quoted=$(printf '%q ' "$@")
    say "+ ${quoted% }"
    if ((!DRY_RUN)); then "$@"; fi
}

# run_quiet CMD...: as run, with the command's stdout discarded (its errors still show).
run_quiet() {
    local quoted
    quoted=$(printf '%q ' "$@")
    say "+ ${quoted% } >/dev/null"
    if ((!DRY_RUN)); then "$@" >/dev/null; fi
}

# A path given on the command line: absolute, and only characters that need no quoting in
# a unit file or a sed expression.
path_arg() {
    [[ $2 =~ ^/[A-Za-z0-9._/-]*$ ]] || refuse "$1 needs an absolute path of letters, digits, . _ - / (got '$2')"
    local p=${2%/}
    printf '%s' "${p:-/}"
}

# The service's own paths: not / or a top-level directory (the script deletes $PREFIX/src
# and writes into these), and not under /home, /root or /run/user, which the unit's
# ProtectHome=yes hides from the service (it would fail with status=203/EXEC or 226/NAMESPACE).
check_service_path() {
    local name=$1 path=$2
    [[ $path =~ ^/[^/]+/. ]] || refuse "$name $path: give a directory of its own, e.g. /opt/daedalus, not / or a top-level directory"
    case $path/ in
        /home/* | /root/* | /run/user/*)
            refuse "$name $path: the unit's ProtectHome=yes hides /home, /root and /run/user from the" \
                "service; use the defaults (/opt/daedalus, /etc/daedalus, /var/lib/daedalus) or /srv/..." ;;
    esac
}

while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --no-start) START=0 ;;
        --python) [[ -n ${2:-} ]] || refuse "--python needs a path"; PYTHON=$2; shift ;;
        --source)
            [[ -n ${2:-} && -d ${2:-} ]] || refuse "--source needs an existing directory (got '${2:-}')"
            SOURCE_DIR=$(cd "$2" && pwd); shift ;;
        --prefix) PREFIX=$(path_arg "$1" "${2:-}"); shift ;;
        --config-dir) CONFIG_DIR=$(path_arg "$1" "${2:-}"); shift ;;
        --state-dir) STATE_DIR=$(path_arg "$1" "${2:-}"); shift ;;
        --systemd-dir) SYSTEMD_DIR=$(path_arg "$1" "${2:-}"); shift ;;
        --logrotate-dir) LOGROTATE_DIR=$(path_arg "$1" "${2:-}"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; refuse "unknown option: $1" ;;
    esac
    shift
done

check_service_path --prefix "$PREFIX"
check_service_path --config-dir "$CONFIG_DIR"
check_service_path --state-dir "$STATE_DIR"
VENV=$PREFIX/.venv
CONFIG=$CONFIG_DIR/config.yaml

# --- checks (also in --dry-run: it shows whether the real run would go ahead) -----------

# pyarrow, DuckDB, Polars and numba publish no 32-bit ARM wheels: pip would try to build
# them from source, which fails (or runs for hours and then fails) on a Pi.
check_architecture() {
    local machine long_bit dpkg_arch why=""
    machine=${DAEDALUS_SETUP_MACHINE:-$(uname -m)}
    long_bit=${DAEDALUS_SETUP_LONG_BIT:-$(getconf LONG_BIT 2>/dev/null || echo unknown)}
    dpkg_arch=${DAEDALUS_SETUP_DPKG_ARCH:-$(dpkg --print-architecture 2>/dev/null || echo unknown)}
    case $machine in
        armv6l | armv7l | armv8l | arm | armhf | armel | i386 | i486 | i586 | i686)
            why="a 32-bit kernel ($machine)" ;;
    esac
    if [[ -z $why && $long_bit == 32 ]]; then
        why="a 32-bit userland (getconf LONG_BIT = 32) on a $machine kernel"
    fi
    if [[ -z $why ]]; then
        case $dpkg_arch in
            armhf | armel | i386) why="a 32-bit userland (dpkg architecture $dpkg_arch) on a $machine kernel" ;;
        esac
    fi
    if [[ -n $why ]]; then
        refuse "refusing to install on $why: pyarrow, DuckDB, Polars and numba publish no" \
            "32-bit ARM wheels, so pip would have to compile them and fails. Flash Raspberry Pi OS" \
            "(64-bit) bookworm (Raspberry Pi Imager: 'Raspberry Pi OS (64-bit)') on a Pi 3, 4, 5 or" \
            "Zero 2 W, then run this again."
    fi
    case $machine in
        aarch64 | arm64 | x86_64 | amd64) say "architecture: $machine, $long_bit-bit userland ($dpkg_arch): ok" ;;
        *) say "architecture: $machine is untested (wheels exist for aarch64 and x86_64); going on" ;;
    esac
}

# The code needs Python 3.11 (pyproject.toml: requires-python >= 3.11; it relies on 3.11
# behaviour such as asyncio timeouts raising the built-in TimeoutError).
python_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }
python_bits() { "$1" -c 'import struct; print(struct.calcsize("P") * 8)' 2>/dev/null || echo unknown; }
version_ok() {
    local major minor
    IFS=. read -r major minor _ <<<"$1"
    [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] && ((major > 3 || (major == 3 && minor >= 11)))
}

check_python() {
    local candidate version found=""
    if [[ -n $PYTHON ]]; then
        [[ -x $PYTHON ]] || PYTHON=$(command -v "$PYTHON" || true)
        [[ -n $PYTHON ]] || refuse "--python: no such interpreter"
        version=$(python_version "$PYTHON") || version="unknown"
        found="$version at $PYTHON"
    else
        for candidate in python3.13 python3.12 python3.11 python3; do
            command -v "$candidate" >/dev/null || continue
            version=$(python_version "$(command -v "$candidate")") || continue
            if version_ok "$version"; then PYTHON=$(command -v "$candidate"); break; fi
            found=${found:-"$version at $(command -v "$candidate")"}
        done
        if [[ -z $PYTHON ]]; then
            version=${found%% *}
            found=${found:-no python3 on PATH}
        fi
    fi
    if ! version_ok "$version"; then
        refuse "Python 3.11 or newer is needed (found: $found): Daedalus uses 3.11 features" \
            "(pyproject.toml requires-python >= 3.11). Raspberry Pi OS bookworm ships 3.11" \
            "(sudo apt install python3 python3-venv); on bullseye (3.9) flash bookworm 64-bit, or install" \
            "3.11+ outside /home and /root (UV_PYTHON_INSTALL_DIR=/opt/python uv python install 3.11)" \
            "and pass --python PATH."
    fi
    # a 32-bit interpreter on a 64-bit system would build a venv pip cannot fill
    local bits
    bits=$(python_bits "$PYTHON")
    if [[ $bits != 64 ]]; then
        refuse "$PYTHON is a $bits-bit Python: pyarrow, DuckDB, Polars and numba publish no 32-bit" \
            "ARM wheels; pass --python PATH to a 64-bit Python 3.11+ (Raspberry Pi OS (64-bit): /usr/bin/python3)"
    fi
    # The venv's python is a symlink to this one's real file, which the unit's ProtectHome=yes
    # hides if it lives under /home or /root (pyenv, uv's default directory).
    local real
    real=${DAEDALUS_SETUP_PYTHON_REALPATH:-$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))' \
        2>/dev/null || echo "$PYTHON")}
    case $real in
        /home/* | /root/* | /run/user/*)
            refuse "$PYTHON is $real, under /home, /root or /run/user, which the unit's ProtectHome=yes" \
                "hides from the service: use the system's python3 (Raspberry Pi OS bookworm: 3.11), or one" \
                "installed elsewhere (UV_PYTHON_INSTALL_DIR=/opt/python uv python install 3.11)" ;;
    esac
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        refuse "$PYTHON cannot create a venv (no ensurepip): sudo apt install python3-venv"
    fi
    say "python: $version at $PYTHON ($bits-bit): ok"
}

check_root() {
    if ((DRY_RUN)); then
        say "dry run: nothing is changed; every action is printed as '+ command'"
    elif ((EUID != 0)); then
        refuse "run it as root (sudo $0), or with --dry-run to see what it would do"
    fi
}

# systemd as PID 1? Not in a chroot or a container image being built: the units are then
# installed and enabled (that works offline) and start at the next boot.
systemd_running() { [[ -d /run/systemd/system ]]; }

# --- helpers for the install steps -----------------------------------------------------

# The units, the logrotate config and the config template carry the default paths; replace
# them (through placeholders, so one replacement never rewrites another's result).
render() {
    sed -e "s|$DEFAULT_PREFIX|@PREFIX@|g" -e "s|$DEFAULT_CONFIG_DIR|@CONFIG_DIR@|g" \
        -e "s|$DEFAULT_STATE_DIR|@STATE_DIR@|g" \
        -e "s|@PREFIX@|$PREFIX|g" -e "s|@CONFIG_DIR@|$CONFIG_DIR|g" -e "s|@STATE_DIR@|$STATE_DIR|g" "$1"
}

# install_rendered SRC DST MODE [OWNER:GROUP]: write render(SRC) to DST when it differs.
install_rendered() {
    local src=$1 dst=$2 mode=$3 owner=${4:-root:root} tmp
    if [[ -f $dst ]] && [[ "$(render "$src")" == "$(cat "$dst")" ]]; then
        say "unchanged: $dst"
        return
    fi
    say "+ render ${src#"$SOURCE_DIR"/} > $dst (mode $mode, owner $owner)"
    if ((!DRY_RUN)); then
        tmp=$(mktemp "$dst.XXXXXX")
        render "$src" >"$tmp"
        chmod "$mode" "$tmp"
        chown "$owner" "$tmp"
        mv -f "$tmp" "$dst"
    fi
}

# --- install steps ---------------------------------------------------------------------

create_user() {
    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
    else
        run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "Daedalus market-data capture" "$SERVICE_USER"
    fi
}

create_directories() {
    run install -d -m 0755 -o root -g root "$PREFIX"
    run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
    # The service may write only here (ReadWritePaths); numba's cache lives here too.
    run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$STATE_DIR/data" \
        "$STATE_DIR/logs" "$STATE_DIR/cache" "$STATE_DIR/cache/numba"
}

# What the script will delete or replace must be its own, checked before any action:
# $PREFIX/src{,.new,.old} carry its marker file, and $PREFIX/.venv is a venv.
is_in_place() { [[ -d $PREFIX/src && $(cd "$PREFIX/src" && pwd -P) == $(cd "$SOURCE_DIR" && pwd -P) ]]; }
check_ours() {
    local dir
    for dir in "$PREFIX/src" "$PREFIX/src.new" "$PREFIX/src.old"; do
        if [[ $dir == "$PREFIX/src" ]] && is_in_place; then continue; fi
        if [[ -e $dir && ! -f $dir/$MARKER ]]; then
            refuse "$dir exists but was not made by setup_pi.sh (no $MARKER): move it away (or" \
                "choose another --prefix) and run this again"
        fi
    done
    if [[ -e $VENV && ! -f $VENV/pyvenv.cfg ]]; then
        refuse "$VENV exists and is not a venv (no pyvenv.cfg): move it away and run this again"
    fi
}

# remove_ours DIR: rm -rf DIR if it is there (check_ours made sure it is ours).
remove_ours() {
    if [[ -e $1 ]]; then run rm -rf "$1"; fi
}

# A fresh copy of the checkout in $PREFIX/src (root-owned, --no-same-owner: the service
# cannot change its own code), without the venv, data, caches or git history; swapped in
# whole so files deleted upstream do not linger. Only pip reads it: the service runs the
# package installed in the venv.
copy_source() {
    local dest=$PREFIX/src upgrade=0
    if is_in_place; then
        say "source: installing $dest in place"
        return
    fi
    if [[ -e $dest ]]; then upgrade=1; fi
    remove_ours "$dest.new"
    remove_ours "$dest.old"
    run mkdir -p "$dest.new"
    run touch "$dest.new/$MARKER"
    local excludes=(--exclude=./.git --exclude=./.venv --exclude=./data --exclude=./.cache --exclude=./build
        --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache)
    # a checkout cloned straight into the prefix must not copy its earlier copy into itself
    if [[ -d $PREFIX && $(cd "$SOURCE_DIR" && pwd -P) == $(cd "$PREFIX" && pwd -P) ]]; then
        excludes+=(--exclude=./src --exclude=./src.new --exclude=./src.old)
    fi
    say "+ tar -C $SOURCE_DIR -cf - . | tar -C $dest.new --no-same-owner -xf -   (without .git .venv data caches build)"
    if ((!DRY_RUN)); then
        tar -C "$SOURCE_DIR" "${excludes[@]}" -cf - . | tar -C "$dest.new" --no-same-owner -xf -
    fi
    # The old copy is renamed away before the new one is renamed in: at any moment there is a
    # complete $dest (or $dest.old), never a half-deleted one.
    if ((upgrade)); then run mv "$dest" "$dest.old"; fi
    run mv "$dest.new" "$dest"
    if ((upgrade)); then run rm -rf "$dest.old"; fi
}

install_venv() {
    if [[ -x $VENV/bin/python ]] && version_ok "$(python_version "$VENV/bin/python" || echo 0.0)"; then
        say "venv exists: $VENV"
    else
        # a venv of a Python that is gone or too old: build it again
        remove_ours "$VENV"
        run "$PYTHON" -m venv "$VENV"
    fi
    # A normal install (not -e): the service runs the installed package, not the checkout.
    # Upgrading in place: a child the supervisor restarts during these minutes may fail to
    # import and is retried after its backoff; the restart below then runs the new code.
    run "$VENV/bin/pip" install --disable-pip-version-check --no-cache-dir "$PREFIX/src"
    # The venv is read-only to the service (PYTHONDONTWRITEBYTECODE=1 in the unit): compile
    # every module now (pip does too, unless PIP_NO_COMPILE is set), or each start of each
    # child would compile them again in memory. compileall exits 1 for a file that does not
    # compile (a package's Python 2 test data), which is harmless.
    if ! run_quiet "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib"; then
        say "compileall: some files did not compile (harmless: they are never imported)"
    fi
}

install_config() {
    if [[ -e $CONFIG ]]; then
        say "keeping $CONFIG (never overwritten; the template is $SOURCE_DIR/deploy/config.yaml)"
    else
        install_rendered "$SCRIPT_DIR/config.yaml" "$CONFIG" 0640 "root:$SERVICE_USER"
    fi
    # as the service user: it must be able to read the file (0640 root:daedalus)
    run_quiet runuser -u "$SERVICE_USER" -- "$VENV/bin/daedalus" config check "$CONFIG"
    check_writable_paths
}

# config_values: status_host, status_port, data_dir and log_dir of $CONFIG, one a line,
# read by the installed package (fails when the venv or the config is not there yet, as in
# a dry run). Use: mapfile -t values < <(config_values)
config_values() {
    [[ -x $VENV/bin/python && -r $CONFIG ]] || return 1
    "$VENV/bin/python" -c 'import sys; from daedalus.config import load_config
c = load_config(sys.argv[1]); s = c.supervisor
print(s.status_host, s.status_port, c.data_dir, c.log_dir, sep="\n")' "$CONFIG" 2>/dev/null
}

# The unit may write only under $STATE_DIR (ReadWritePaths): a data_dir or log_dir moved
# elsewhere (an SSD) needs a drop-in, or every child fails with "Read-only file system".
check_writable_paths() {
    local values=() path
    mapfile -t values < <(config_values || true)
    ((${#values[@]} == 4)) || return 0
    for path in "${values[@]:2}"; do
        case $path/ in
            "$STATE_DIR"/*) ;;
            "${values[2]}"/?*) ;;  # log_dir inside data_dir: one ReadWritePaths covers both
            *) say "WARNING: $path (in $CONFIG) is outside $STATE_DIR, the only directory the service" \
                "may write: sudo systemctl edit daedalus, add [Service] ReadWritePaths=$path, and" \
                "chown it to $SERVICE_USER" ;;
        esac
    done
}

install_units() {
    local unit dir
    for dir in "$SYSTEMD_DIR" "$LOGROTATE_DIR"; do
        if [[ ! -d $dir ]]; then run install -d -m 0755 "$dir"; fi
    done
    command -v logrotate >/dev/null || say "logrotate is not installed: sudo apt install logrotate (health.log then rotates)"
    for unit in daedalus.service daedalus-health.service daedalus-health.timer; do
        install_rendered "$SCRIPT_DIR/$unit" "$SYSTEMD_DIR/$unit" 0644
    done
    install_rendered "$SCRIPT_DIR/logrotate/daedalus" "$LOGROTATE_DIR/daedalus" 0644
}

start_service() {
    if ((!DRY_RUN)) && ! systemd_running; then
        run systemctl enable daedalus.service daedalus-health.timer
        say "systemd is not running here (a chroot or container?): enabled; they start at the next boot"
        return
    fi
    run systemctl daemon-reload
    run systemctl enable daedalus.service daedalus-health.timer
    if ((!START)); then
        say "not started (--no-start): sudo systemctl start daedalus.service daedalus-health.timer"
        return
    fi
    # Type=notify: this returns once the supervisor has sent READY=1, or fails.
    if ! run systemctl restart daedalus.service; then
        say "daedalus.service did not start: journalctl -u daedalus -n 50 --no-pager" >&2
        exit 1
    fi
    run systemctl restart daedalus-health.timer
}

# --- advice ----------------------------------------------------------------------------

swap_advice() {
    local meminfo=${DAEDALUS_SETUP_MEMINFO:-/proc/meminfo} mem_mb swap_mb
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' "$meminfo" 2>/dev/null || true)
    swap_mb=$(awk '/^SwapTotal:/ {print int($2 / 1024)}' "$meminfo" 2>/dev/null || true)
    [[ -n $mem_mb && -n $swap_mb ]] || { say "memory: unknown ($meminfo unreadable)"; return; }
    say "memory: ${mem_mb} MB RAM, ${swap_mb} MB swap"
    if ((mem_mb < 2048 || swap_mb == 0)); then
        cat <<EOF
swap advice: the ETL peaks at ~0.4-0.6 GB (numba compiling at its first start, a large
  segment being decoded) next to capture. Give the Pi 1-2 GB of swap so the kernel pages
  instead of OOM-killing a child:
    sudo dphys-swapfile swapoff
    sudo sed -i 's/^#\\?CONF_SWAPSIZE=.*/CONF_SWAPSIZE=1024/' /etc/dphys-swapfile
    sudo dphys-swapfile setup && sudo dphys-swapfile swapon
  (or compressed swap in RAM, easier on an SD card: sudo apt install zram-tools)
EOF
    fi
    if ((mem_mb < 3072)); then
        cat <<EOF
memory limits: the unit's MemoryHigh=2G / MemoryMax=2560M suit 4 GB and more. Here, lower
  them (sudo systemctl edit daedalus: [Service] MemoryHigh=1200M MemoryMax=1500M) and
  supervisor.memory_warning_mb / memory_critical_mb in $CONFIG to 384 / 640.
EOF
    fi
    if ((mem_mb < 1536)); then
        say "  With ${mem_mb} MB, capture and the ETL's peaks hardly fit: swap is a must; expect" \
            "child_memory_restart now and then (nothing is lost). A Pi with 2 GB or more is advised."
    fi
}

status_url() {
    local host=127.0.0.1 port=8787 values=()
    mapfile -t values < <(config_values || true)
    if ((${#values[@]} == 4)); then host=${values[0]} port=${values[1]}; fi
    if [[ $host == 0.0.0.0 || $host == "::" ]]; then
        local ip
        for ip in $(hostname -I 2>/dev/null || true); do say "status page: http://$ip:$port/"; done
    else
        say "status page: http://$host:$port/  (from another machine: ssh -L $port:127.0.0.1:$port <user>@<pi>," \
            "or set supervisor.status_host: 0.0.0.0 in $CONFIG on a trusted network)"
    fi
}

next_steps() {
    cat <<EOF
check it runs:
  systemctl status daedalus                  active (running), STATUS= "supervising N children"
  journalctl -u daedalus -f                  the supervisor's log; children: $STATE_DIR/logs/
  sudo -u $SERVICE_USER $VENV/bin/daedalus status --config $CONFIG
  sudo -u $SERVICE_USER $VENV/bin/daedalus health --config $CONFIG
  systemctl list-timers daedalus-health.timer; journalctl -u daedalus-health
EOF
}

main() {
    say "daedalus setup: source $SOURCE_DIR, prefix $PREFIX, config $CONFIG, state $STATE_DIR"
    check_architecture
    check_python
    check_root
    check_ours
    create_user
    create_directories
    copy_source
    install_venv
    install_config
    install_units
    start_service
    swap_advice
    status_url
    next_steps
}

main
