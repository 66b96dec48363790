"""Summarise an ``ncu --csv`` report: time per kernel name, or every metric per launch.

python tools/ncu_summary.py report.csv            # total gpu__time_duration per kernel
python tools/ncu_summary.py report.csv --order    # each launch's time, in launch order
python tools/ncu_summary.py report.csv --wide     # each launch, every metric collected
"""

import collections
import csv
import sys

with open(sys.argv[1]) as report:
    rows = list(csv.reader(report))
start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
hdr, data = rows[start], rows[start + 1 :]
col = {
    name: hdr.index(name)
    for name in (
        "ID",
        "Kernel Name",
        "Metric Name",
        "Metric Value",
        "Metric Unit",
        "Grid Size",
        "Block Size",
    )
}
UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}


def short(name: str) -> str:
    return name.split("(")[0][:90]


launches: dict[str, dict] = {}
for r in data:
    if len(r) <= col["Metric Value"]:
        continue
    launch = launches.setdefault(
        r[col["ID"]],
        {
            "name": short(r[col["Kernel Name"]]),
            "grid": r[col["Grid Size"]],
            "block": r[col["Block Size"]],
            "metrics": {},
        },
    )
    value = r[col["Metric Value"]].replace(",", "")
    unit = r[col["Metric Unit"]]
    try:
        number = float(value)
    except ValueError:
        continue
    if r[col["Metric Name"]] == "gpu__time_duration.sum":
        number *= UNITS.get(unit, 1e-3)
        unit = "us"
    launch["metrics"][r[col["Metric Name"]]] = (number, unit)

if "--wide" in sys.argv:
    for launch in launches.values():
        metrics = " ".join(
            f"{k.split('__')[-1]}={v:.4g}{u if u not in ('', 'register/thread') else ''}"
            for k, (v, u) in launch["metrics"].items()
        )
        print(f"{launch['name']} {launch['grid']} {launch['block']}\n    {metrics}")
    sys.exit()
tot: collections.Counter = collections.Counter()
cnt: collections.Counter = collections.Counter()
for launch in launches.values():
    t = launch["metrics"].get("gpu__time_duration.sum", (0.0, "us"))[0]
    if "--order" in sys.argv:
        print(f"{t:9.2f} us  {launch['name']} {launch['grid']} {launch['block']}")
    tot[launch["name"]] += t
    cnt[launch["name"]] += 1
print("kernels", sum(cnt.values()), "total us", round(sum(tot.values()), 1))
for n, t in tot.most_common(30):
    print(f"{t:9.1f} us {cnt[n]:4d} {t / cnt[n]:8.2f}  {n}")
