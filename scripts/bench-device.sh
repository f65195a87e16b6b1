#!/usr/bin/env bash
# Run the fams hardware benchmark with the log on a block device you name, safely.
#
#   scripts/bench-device.sh /dev/nvme0n1p3 [--dir /mnt/nvme/bench] [--quick] [--yes]
#
# The device's contents are DESTROYED. Before anything is written this script checks that the
# path is a block device, that it is not mounted or in use (swap, RAID, LVM, a mounted partition
# of it), shows what blkid finds on it, and asks you to type the device name to confirm (skip the
# question with --yes). Results go to bench-<device>-<date>.{json,svg,txt} in the current directory.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
dev=$1; shift
dir="" quick="" yes=""
while [ $# -gt 0 ]; do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    --quick) quick=--quick; shift ;;
    --yes) yes=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done

[ -b "$dev" ] || { echo "$dev is not a block device" >&2; exit 1; }
if findmnt -rn -S "$dev" >/dev/null 2>&1 || lsblk -nro MOUNTPOINT "$dev" 2>/dev/null | grep -q .; then
  echo "$dev (or a partition of it) is mounted; refusing" >&2; exit 1
fi
if grep -q "^$(readlink -f "$dev") " /proc/swaps 2>/dev/null; then
  echo "$dev is in use as swap; refusing" >&2; exit 1
fi
holders="/sys/class/block/$(basename "$(readlink -f "$dev")")/holders"
if [ -d "$holders" ] && [ -n "$(ls -A "$holders")" ]; then
  echo "$dev is held by $(ls "$holders" | tr '\n' ' ')(RAID/LVM/dm); refusing" >&2; exit 1
fi

echo "device:   $dev ($(lsblk -dno SIZE,MODEL "$dev" 2>/dev/null | xargs))"
echo "contents: $(blkid -p "$dev" 2>/dev/null || echo 'nothing blkid recognises')"
if [ -z "$yes" ]; then
  read -r -p "Everything on $dev will be destroyed. Type the device path to go on: " answer
  [ "$answer" = "$dev" ] || { echo "not confirmed; nothing was written"; exit 1; }
fi

famsd=${FAMSD:-}
if [ -z "$famsd" ]; then
  cargo build --release -p famsd >&2
  famsd="$(dirname "$0")/../target/release/famsd"
fi
stamp="bench-$(basename "$dev")-$(date +%Y%m%d-%H%M%S)"
args=(bench --log "$dev" --force $quick --svg "$stamp.svg" --save-json "$stamp.json")
[ -n "$dir" ] && args+=(--dir "$dir")
"$famsd" "${args[@]}" | tee "$stamp.txt"
echo "wrote $stamp.txt, $stamp.json, $stamp.svg"
