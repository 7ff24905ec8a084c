#!/usr/bin/env bash
# make pi-check: the product on a Raspberry Pi 4's CPU, emulated with qemu-aarch64 -cpu cortex-a72.
#
# Builds (once, cached under .cache/pi-check/, reused by later runs) an arm64 Debian sysroot
# with python3.11 and the project's runtime dependencies as aarch64 wheels from PyPI, then runs
# deploy/pi-check/smoke.py: sim -> ingest -> etl -> DuckDB/Polars read-back, all emulated,
# compared with the same ETL run natively. See the README section "make pi-check".
#
#   bash deploy/pi-check.sh                       # the check (~250 MB downloaded the first time)
#   bash deploy/pi-check.sh --with pyarrow==21.0.0  # the same with a pinned version (repeatable)
#   bash deploy/pi-check.sh --clean               # remove .cache/pi-check
# Writes only under .cache/pi-check (PI_CHECK_CACHE=DIR elsewhere; and .venv via make venv):
# the system's apt sources, architectures and lists are never touched (apt runs on a private
# state there). PI_CHECK_RECORDING=FILE replays that recording; PI_CHECK_DEBIAN_MIRROR=URL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${PI_CHECK_CACHE:-$ROOT/.cache/pi-check}"
# The reference recording when it is there (next to the checkout); else the simulator's
# seeded synthetic market, so a fresh clone needs nothing but the network.
RECORDING="${PI_CHECK_RECORDING:-$ROOT/../shared/data/coinbase-advanced-trade-2026-08-09.jsonl.zst}"
SYSROOT="$CACHE/sysroot"
WHEELS="$CACHE/wheels"
PY="$ROOT/.venv/bin/python"
# Debian bookworm arm64 (what Raspberry Pi OS bookworm 64-bit is built on): the interpreter and
# its standard library; apt pulls in libc6, libssl3, libffi8, zlib1g, libsqlite3... The wheels
# need libstdc++6 and libgcc-s1 besides (manylinux leaves them to the system).
DEBS=(python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1 zlib1g)
# The wheels' platforms: glibc 2.36 on bookworm accepts every manylinux tag up to 2_36.
PLATFORM=(--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64
          --platform manylinux_2_34_aarch64 --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)

STEP="start"
trap 'echo "pi-check: FAILED at step: $STEP" >&2' ERR
step() { STEP="$1"; echo; echo "=== pi-check: $1"; }

EXTRA=()
while (($#)); do
    case "$1" in
        --clean) rm -rf "$CACHE"; echo "removed $CACHE"; exit 0 ;;
        --with) EXTRA+=("${2:?--with needs a requirement, e.g. pyarrow==21.0.0}"); shift 2 ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "pi-check: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

step "qemu-user (qemu-aarch64 with the cortex-a72 model)"
if ! command -v qemu-aarch64 >/dev/null; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "qemu-aarch64 is missing: apt-get install qemu-user (root, the system's apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq qemu-user >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null; }
    else
        echo "pi-check: qemu-aarch64 is missing; install it with: sudo apt-get install qemu-user" >&2
        exit 1
    fi
fi
if ! { qemu-aarch64 -cpu help || true; } | grep -qw cortex-a72; then  # help exits 1
    echo "pi-check: this qemu-aarch64 has no cortex-a72 CPU model ($(qemu-aarch64 --version | sed -n 1p));" \
         "Debian 11 or newer has it" >&2
    exit 1
fi
qemu-aarch64 --version | sed -n 1p

step "native venv (.venv, for the comparison run and pip)"
make -s -C "$ROOT" venv
if [[ -f "$RECORDING" ]]; then
    SOURCE=(--recording "$RECORDING")
elif [[ -n "${PI_CHECK_RECORDING:-}" ]]; then
    echo "pi-check: PI_CHECK_RECORDING=$PI_CHECK_RECORDING: no such file" >&2
    exit 2
else
    echo "no recording at $RECORDING: the simulator's synthetic market stands in"
    SOURCE=()
fi

step "arm64 sysroot with python3.11 (Debian bookworm packages)"
if [[ ! -f "$SYSROOT/.complete" ]]; then
    # A private apt state under $CACHE/apt: its own sources (bookworm, what Raspberry Pi OS
    # bookworm is built on, whatever the host runs), lists, status, archives and log; the
    # host's apt.conf.d is still read (a proxy), but its hooks are cleared so nothing runs on
    # the system's behalf. The system's sources, dpkg architectures and lists stay untouched.
    KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f $KEYRING ]] || { echo "pi-check: $KEYRING is missing: sudo apt-get install debian-archive-keyring" >&2; exit 1; }
    APT="$CACHE/apt"
    mkdir -p "$APT"/{lists/partial,archives/partial,etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,log}
    : >"$APT/status"
    MIRROR="${PI_CHECK_DEBIAN_MIRROR:-http://deb.debian.org}"
    printf 'Types: deb\nURIs: %s/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: %s\n\nTypes: deb\nURIs: %s/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: %s\n' \
        "$MIRROR" "$KEYRING" "$MIRROR" "$KEYRING" >"$APT/etc/sources.list.d/debian.sources"
    cat >"$APT/apt.conf" <<EOF
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear DPkg::Pre-Install-Pkgs;
APT::Architecture "arm64";
#clear APT::Architectures;
APT::Architectures { "arm64"; };
APT::Install-Recommends "false";
APT::Sandbox::User "$(id -un)";
Debug::NoLocking "true";
Dir::State "$APT";
Dir::State::Lists "$APT/lists";
Dir::State::status "$APT/status";
Dir::State::extended_states "$APT/extended_states";
Dir::Cache "$APT";
Dir::Cache::Archives "$APT/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Etc "$APT/etc";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$APT/etc/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$APT/etc/preferences.d";
Dir::Etc::Trusted "/etc/apt/trusted.gpg";
Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d";
Dir::Log "$APT/log";
EOF
    APT_OPTS=(-c "$APT/apt.conf")
    apt-get "${APT_OPTS[@]}" -qq update
    apt-get "${APT_OPTS[@]}" -y -qq install --download-only "${DEBS[@]}" >/dev/null
    rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
    debs=("$APT"/archives/*.deb)
    for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$SYSROOT"; done
    echo "${#debs[@]} packages, $(du -sh "$APT/archives" | cut -f1) downloaded"
    touch "$SYSROOT/.complete"
else
    echo "cached: $SYSROOT"
fi
EMU=(nice -n 10 qemu-aarch64 -cpu cortex-a72 -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11")
"${EMU[@]}" -c 'import platform, sys; print("emulated:", sys.version.split()[0], platform.machine())'

step "aarch64 wheels (PyPI) of the runtime dependencies"
# pyproject's runtime dependencies, less matplotlib (plot/demo only), plus polars (the read-back).
REQS="$("$PY" - "${EXTRA[@]+"${EXTRA[@]}"}" <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]  # the script runs from $ROOT
reqs = [r for r in project["dependencies"] if not r.lower().startswith("matplotlib")]
reqs += [r for r in project["optional-dependencies"]["dev"] if r.lower().startswith("polars")]
print("\n".join(sorted(reqs + sys.argv[1:])))
EOF
)"
KEY="$(printf '%s\n' "$REQS" | sha256sum | cut -c1-12)"
SITE="$CACHE/site-$KEY"
if [[ ! -f "$SITE/.complete" ]]; then
    printf '%s\n' "$REQS" >"$CACHE/requirements-$KEY.txt"
    mkdir -p "$WHEELS"
    # Files already in $WHEELS are not downloaded again; the index is only asked for versions.
    "$PY" -m pip download -q "${PLATFORM[@]}" -d "$WHEELS" -r "$CACHE/requirements-$KEY.txt" 2> >(grep -v "is ignored" >&2)
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-warn-conflicts --no-index --find-links "$WHEELS" --no-compile --target "$SITE" "${PLATFORM[@]}" \
        -r "$CACHE/requirements-$KEY.txt" 2> >(grep -v "is ignored" >&2)
    touch "$SITE/.complete"
    echo "installed into $SITE ($(du -sh "$SITE" | cut -f1); wheels cache $(du -shL "$WHEELS" | cut -f1))"
else
    echo "cached: $SITE"
fi
PYTHONPATH="$SITE" "${EMU[@]}" - <<'EOF'
from importlib.metadata import version
print("aarch64 wheels:", ", ".join(f"{p} {version(p)}" for p in ("numpy", "numba", "pyarrow", "duckdb", "polars")))
EOF

step "imports on the cortex-a72 (each compiled dependency, one process each)"
for module in numpy numba llvmlite pyarrow pyarrow.parquet duckdb polars orjson zstandard pydantic_core yaml \
              aiohttp psutil; do
    STEP="import $module on the cortex-a72"
    if PYTHONPATH="$SITE" "${EMU[@]}" -c "import $module"; then
        echo "ok    $module"
    else
        code=$?
        why="exit code $code"; ((code > 128)) && why="killed by SIG$(kill -l $((code - 128)))"
        echo "FAIL  $module: $why on -cpu cortex-a72" >&2
        # The same import on qemu's "max" CPU (every optional instruction): passing there means
        # the wheel uses instructions a Pi 4 lacks (e.g. pyarrow 21.0.0, apache/arrow#47229).
        if PYTHONPATH="$SITE" "${EMU[@]/cortex-a72/max}" -c "import $module" 2>/dev/null; then
            echo "      $module imports on -cpu max: this version is built for newer CPUs than the Pi 4's" \
                 "cortex-a72; pin another one (e.g. --with '$module!=VERSION') and raise pyproject's bound" >&2
        fi
        false
    fi
done

step "smoke under emulation: sim -> ingest -> etl -> read-back, compared with native"
"$PY" "$ROOT/deploy/pi-check/smoke.py" --sysroot "$SYSROOT" --site "$SITE" --cache "$CACHE" \
    "${SOURCE[@]+"${SOURCE[@]}"}" --summary "$CACHE/summary-$KEY.json"

echo
echo "pi-check: OK (the figures are in $CACHE/summary-$KEY.json)"
