#!/usr/bin/env bash
# Power cuts of real turn nodes (needs root: FUSE, losetup, mount, mkfs.ext4):
#
#   sudo scripts/turns-power-cut.sh [CUTS] [SEED] [TRANSFERS_PER_NODE]   # default 40, fixed seed, 6000
#   sudo scripts/turns-power-cut.sh --lying-drive [CUTS] [SEED]          # the negative control
#
# A bank of three `famsd node bank` processes on 127.0.0.1; nodes 1 and 2 keep their heaps and
# logs (a log file on ext4, and a raw loop device) on simulated drives with volatile write caches
# (the FUSE power-cut disk), whose power is cut CUTS times while money moves; node 3 and the
# others are SIGKILLed now and then. At the end: total conserved, every transfer applied exactly
# once and in order, run finished. Prints one line per cut and a summary. With --lying-drive,
# node 2's log drive acknowledges flushes without flushing, and the run must report violations.
# See tests/tests/turns_power_cut.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
test_name=turn_nodes_survive_power_cuts_on_the_fuse_disk
ignored=()
if [ "${1:-}" = "--lying-drive" ]; then
  shift
  test_name=turns_power_cut_catches_a_log_drive_that_ignores_flushes
  ignored=(--ignored)
fi
[ -n "${1:-}" ] && export FAMS_TURNS_POWER_CUT_CYCLES="$1"
[ -n "${2:-}" ] && export FAMS_TURNS_POWER_CUT_SEED="$2"
[ -n "${3:-}" ] && export FAMS_TURNS_POWER_CUT_TRANSFERS="$3"
export FAMS_TURNS_POWER_CUT_PROGRESS=1
exec cargo test --release -p fams-tests --test turns_power_cut -- --exact "$test_name" "${ignored[@]}" --nocapture
