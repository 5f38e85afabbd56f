#!/usr/bin/env bash
# Installs the system tools the netns runtime and its tests use (iproute2, nftables, curl,
# etcd for the store backend of several managers),
# when running as root on Debian/Ubuntu and they are missing. Without root it only says so:
# the tests that need them are skipped with a reason.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v etcd >/dev/null || need+=(etcd-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: missing ${need[*]} (install them for the root-only network tests)" >&2
  exit 0
fi
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
