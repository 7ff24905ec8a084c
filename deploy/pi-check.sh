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
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache/pi-check"
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
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "pi-check: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

step "qemu-user (qemu-aarch64 with the cortex-a72 model)"
if ! command -v qemu-aarch64 >/dev/null; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq qemu-user >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null; }
    else
        echo "pi-check: qemu-aarch64 is missing; install it with: sudo apt-get install qemu-user" >&2
        exit 1
    fi
fi
{ qemu-aarch64 -cpu help || true; } | grep -w cortex-a72 >/dev/null  # help exits 1
qemu-aarch64 --version | sed -n 1p

step "native venv (.venv, for the comparison run and pip)"
make -s -C "$ROOT" venv
[[ -f "$RECORDING" ]] || { echo "pi-check: recording not found: $RECORDING (set PI_CHECK_RECORDING)" >&2; false; }

step "arm64 sysroot with python3.11 (Debian bookworm packages)"
if [[ ! -f "$SYSROOT/.complete" ]]; then
    # A private apt state: the system's dpkg architectures and package lists stay untouched.
    APT="$CACHE/apt"
    mkdir -p "$APT"/{lists/partial,archives/partial,etc/sources.list.d,etc/preferences.d,etc/apt.conf.d}
    : >"$APT/status"
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        cp /etc/apt/sources.list.d/debian.sources "$APT/etc/sources.list.d/"
    else
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$APT/etc/sources.list.d/debian.sources"
    fi
    APT_OPTS=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o "Dir::State=$APT"
              -o "Dir::State::Lists=$APT/lists" -o "Dir::State::status=$APT/status" -o "Dir::Cache=$APT"
              -o "Dir::Cache::Archives=$APT/archives" -o "Dir::Etc=$APT/etc" -o Dir::Etc::SourceList=/dev/null
              -o "Dir::Etc::SourceParts=$APT/etc/sources.list.d" -o Dir::Etc::Trusted=/etc/apt/trusted.gpg
              -o Dir::Etc::TrustedParts=/etc/apt/trusted.gpg.d -o APT::Sandbox::User="$(id -un)"
              -o Debug::NoLocking=1 -o APT::Install-Recommends=0)
    apt-get "${APT_OPTS[@]}" -qq update
    apt-get "${APT_OPTS[@]}" -y -qq install --download-only "${DEBS[@]}" >/dev/null
    rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
    for deb in "$APT"/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
    echo "$(ls "$APT"/archives/*.deb | wc -l) packages, $(du -sh "$APT/archives" | cut -f1) downloaded"
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
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
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
    echo "installed into $SITE ($(du -sh "$SITE" | cut -f1); wheels cache $(du -sh "$WHEELS" | cut -f1))"
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
    --recording "$RECORDING" --summary "$CACHE/summary-$KEY.json"

echo
echo "pi-check: OK (the figures are in $CACHE/summary-$KEY.json)"
