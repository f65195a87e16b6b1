#!/usr/bin/env python3
"""Count unsafe *operations* per crate of the workspace.

An unsafe block with one operation counts 1; clippy's `multiple_unsafe_ops_per_block` reports the
blocks holding more, with their operation count, so merging blocks cannot lower the figure.
Blocks are found in the source (`unsafe {`, comments skipped); `unsafe fn`/`unsafe impl`
declarations are listed separately (they are promises made to callers, not operations).

Usage: scripts/unsafe-ops.py [--json]   (runs cargo clippy in release mode over all targets)
"""
import json, os, re, subprocess, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
crates = ["fams-lib", "famsd", "tests", "bench"]

def source_files(crate):
    for d, _, files in os.walk(os.path.join(root, crate)):
        if "/target" in d:
            continue
        for f in files:
            if f.endswith(".rs"):
                yield os.path.join(d, f)

block = re.compile(r"\bunsafe\s*\{")
decl = re.compile(r"\bunsafe\s+(fn|impl|extern)\b")
blocks, decls, block_lines = {}, {}, set()
for c in crates:
    blocks[c] = decls[c] = 0
    for path in source_files(c):
        rel = os.path.relpath(path, root)
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            code = line.split("//", 1)[0]
            for _ in block.finditer(code):
                blocks[c] += 1
                block_lines.add((rel, n))
            decls[c] += len(decl.findall(code))

out = subprocess.run(
    ["cargo", "clippy", "--workspace", "--all-targets", "--release", "--message-format=json",
     "--", "-W", "clippy::multiple_unsafe_ops_per_block"],
    cwd=root, capture_output=True, text=True)
extra, seen = {c: 0 for c in crates}, set()
for line in out.stdout.splitlines():
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    m = msg.get("message") or {}
    code = (m.get("code") or {}).get("code", "")
    if code != "clippy::multiple_unsafe_ops_per_block":
        continue
    span = m["spans"][0]
    key = (span["file_name"], span["line_start"])
    if key in seen:
        continue
    seen.add(key)
    n = int(re.search(r"contains (\d+) unsafe operations", m["message"]).group(1))
    crate = span["file_name"].split("/", 1)[0]
    if crate in extra:
        extra[crate] += n - 1

report = {c: {"unsafe_blocks": blocks[c], "unsafe_operations": blocks[c] + extra[c],
              "blocks_with_several_operations": sum(1 for k in seen if k[0].startswith(c + "/")),
              "unsafe_fn_impl_extern_declarations": decls[c]} for c in crates}
if "--json" in sys.argv:
    print(json.dumps(report, indent=2))
else:
    print(f"{'crate':<10} {'unsafe ops':>10} {'blocks':>7} {'multi-op blocks':>16} {'unsafe fn/impl':>15}")
    for c, r in report.items():
        print(f"{c:<10} {r['unsafe_operations']:>10} {r['unsafe_blocks']:>7} "
              f"{r['blocks_with_several_operations']:>16} {r['unsafe_fn_impl_extern_declarations']:>15}")
    t = lambda k: sum(r[k] for r in report.values())
    print(f"{'total':<10} {t('unsafe_operations'):>10} {t('unsafe_blocks'):>7} "
          f"{t('blocks_with_several_operations'):>16} {t('unsafe_fn_impl_extern_declarations'):>15}")
