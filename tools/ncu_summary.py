"""Summarise an ncu --csv gpu__time_duration.sum report: time per kernel name (stdin or path)."""

import collections
import csv
import sys

rows = list(csv.reader(open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin))
start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
hdr, data = rows[start], rows[start + 1 :]
ki, vi, ui = hdr.index("Kernel Name"), hdr.index("Metric Value"), hdr.index("Metric Unit")
gi, bi = hdr.index("Grid Size"), hdr.index("Block Size")
order = "--order" in sys.argv
tot: collections.Counter = collections.Counter()
cnt: collections.Counter = collections.Counter()
for r in data:
    if len(r) <= vi:
        continue
    val = float(r[vi].replace(",", "")) * {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(r[ui], 1e-3)
    name = r[ki].split("(")[0][:90]
    if order:
        print(f"{val:9.2f} us  {name} {r[gi]} {r[bi]}")
    tot[name] += val
    cnt[name] += 1
print("kernels", sum(cnt.values()), "total us", round(sum(tot.values()), 1))
for n, t in tot.most_common(30):
    print(f"{t:9.1f} us {cnt[n]:4d} {t / cnt[n]:8.2f}  {n}")
