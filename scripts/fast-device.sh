#!/usr/bin/env bash
# A stand-in for a fast NVMe drive, made of RAM-backed zram block devices (needs root).
#
#   scripts/fast-device.sh up   [--dir /mnt/fams-fast]   # make and mount them; prints what to run
#   scripts/fast-device.sh down [--dir /mnt/fams-fast]   # unmount and remove them
#   scripts/fast-device.sh status [--dir /mnt/fams-fast]
#
# What it is: two zram devices made with /sys/class/zram-control/hot_add —
#   * FS:  ext4, mounted at DIR, for the heap, a log file and the baselines (SQLite, LMDB), sized
#          for a 4 GiB heap;
#   * RAW: a raw 8 GiB block device for a block-device log.
# Mostly-zero pages compress to almost nothing, so they take little RAM until written.
#
# What it is NOT: a model of a real drive's flush. A flush here costs nothing and a write is a
# memory copy, so what `famsd bench` measures on it is our own CPU cost above a near-zero floor —
# the way an NVMe drive with power-loss protection (FUA in ~10-20 us) would expose it. Durability
# figures from it mean nothing: it forgets everything at a reboot.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
cmd=$1; shift
dir=/mnt/fams-fast
while [ $# -gt 0 ]; do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
state=/run/fams-fast-device   # which zram devices we made (so `down` removes only ours)

need_root() { [ "$(id -u)" -eq 0 ] || { echo "fast-device.sh: needs root (zram, mkfs, mount)" >&2; exit 1; }; }
need_zram() {
  [ -w /sys/class/zram-control/hot_add ] || {
    echo "fast-device.sh: no zram here (/sys/class/zram-control/hot_add); try 'modprobe zram'" >&2; exit 1; }
}

make_zram() { # SIZE -> prints /dev/zramN
  local n
  n=$(cat /sys/class/zram-control/hot_add)
  echo "$1" > "/sys/block/zram$n/disksize"
  echo "/dev/zram$n"
}

case $cmd in
  up)
    need_root; need_zram
    if [ -e "$state" ]; then echo "fast-device.sh: already up ($(cat "$state")); run 'down' first" >&2; exit 1; fi
    fs=$(make_zram 6G)   # a 4 GiB heap + a log file + the baselines' files
    raw=$(make_zram 8G)  # a block-device log area
    echo "$fs $raw" > "$state"
    mkfs.ext4 -q -F "$fs"
    mkdir -p "$dir"
    mount "$fs" "$dir"
    echo "fast device up:"
    echo "  $fs  ext4 at $dir (heap, log file, baselines)"
    echo "  $raw raw block device (a block-device log)"
    echo "run, for example:"
    echo "  famsd bench --quick --dir $dir/bench"
    echo "  famsd bench --quick --dir $dir/bench --log $raw      # log on the raw device"
    echo "remember: flushes cost nothing here; read the overhead above the floor, not durability"
    ;;
  down)
    need_root
    [ -e "$state" ] || { echo "fast-device.sh: nothing to take down (no $state)"; exit 0; }
    read -r fs raw < "$state"
    if findmnt -rn -S "$fs" >/dev/null 2>&1; then umount "$fs"; fi
    for d in $fs $raw; do
      n=${d#/dev/zram}
      echo 1 > "/sys/block/zram$n/reset" 2>/dev/null || true
      echo "$n" > /sys/class/zram-control/hot_remove 2>/dev/null || true
    done
    rm -f "$state"
    echo "fast device down ($fs $raw removed)"
    ;;
  status)
    if [ -e "$state" ]; then
      read -r fs raw < "$state"
      echo "up: $fs ($(findmnt -rno TARGET -S "$fs" 2>/dev/null || echo 'not mounted')), $raw"
      for d in $fs $raw; do
        n=${d#/dev/zram}
        echo "  $d disksize $(cat "/sys/block/zram$n/disksize") bytes, mm_stat $(cat "/sys/block/zram$n/mm_stat")"
      done
    else
      echo "down"
    fi
    ;;
  *) usage ;;
esac
