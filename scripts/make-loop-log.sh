#!/usr/bin/env bash
# Make a loop device to try a raw-device log without a spare disk (needs root):
#
#   scripts/make-loop-log.sh [SIZE] [IMAGE]      # default 256M, /var/tmp/fams-log.img
#
# Prints the device (e.g. /dev/loop0). Use it with `famsd format --log /dev/loopN` or
# `famsd torture --log /dev/loopN`. Detach it afterwards with `losetup -d /dev/loopN`.
set -euo pipefail
size=${1:-256M}
image=${2:-/var/tmp/fams-log.img}
truncate -s "$size" "$image"
losetup -f --show --direct-io=on "$image"
