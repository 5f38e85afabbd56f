#!/usr/bin/env bash
# The mesh's forwarding step is compiled at install (setup.py) when a C compiler and Python's
# headers are there; without them corral installs anyway and forwards in Python, slower.
# As root on Debian/Ubuntu, install what is missing; otherwise only say so.
set -euo pipefail
py=${1:-python3}
need=()
command -v cc >/dev/null || need+=(gcc libc6-dev)
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [ ! -f "$inc/Python.h" ]; then
  ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  need+=("python$ver-dev")
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: missing ${need[*]}: the mesh will forward in Python (slower)" >&2
  exit 0
fi
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null ||
  echo "note: could not install ${need[*]}: the mesh will forward in Python (slower)" >&2
