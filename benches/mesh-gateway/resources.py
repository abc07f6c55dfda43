#!/usr/bin/env python3
"""CPU per request and peak RSS of each process of a benches/mesh-gateway.sh
row (outbound sidecar, gateway, inbound sidecar), from /proc, with the
helpers of benches/proxy_resources.py (as benches/mesh_resources.py measures
the pairs): wrk keep-alive, one thread on cpu0, 32 connections, against the
row as it runs (the script calls this after the row's measured runs, so it is
warm); each process's utime+stime over the run / requests completed.

  resources.py measure ROW PORT HOST SECONDS out=PGID gw=PGID in=PGID >>FILE
      one tab-separated line: row, rps, then us/req and peak MB per process
  resources.py table FILE
      the table, and the agents row's ratios to the Envoy and HAProxy rows
"""
import os, sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from proxy_resources import cpu_s, group_pids, status_kb, wrk  # noqa: E402

PARTS = ("out", "gw", "in")


def measure(row, port, host, seconds, groups):
    pg = dict(g.split("=", 1) for g in groups)
    if sorted(pg) != sorted(PARTS):
        sys.exit(f"measure: want {', '.join(p + '=PGID' for p in PARTS)}, got {groups}")
    pids = {k: group_pids(int(v)) for k, v in pg.items()}
    for k, v in pids.items():
        if not v:
            sys.exit(f"measure {row}: process group {pg[k]} ({k}) is gone")
    c0 = {k: cpu_s(v) for k, v in pids.items()}
    n = wrk(f"http://127.0.0.1:{port}/", seconds, "-H", f"Host: {host}")
    c1 = {k: cpu_s(v) for k, v in pids.items()}
    cols = [row, "%.0f" % (n / seconds)]
    cols += ["%.1f" % ((c1[k] - c0[k]) * 1e6 / n) for k in PARTS]
    cols += ["%.1f" % (status_kb(pids[k], "VmHWM") / 1024) for k in PARTS]
    print("\t".join(cols))


def table(path):
    rows = {}
    for line in open(path):
        f = line.split()
        rows[f[0]] = {"rps": float(f[1]), **{k: float(v) for k, v in zip(PARTS, f[2:5])},
                      **{k + "_mb": float(v) for k, v in zip(PARTS, f[5:8])}}
    fmt = "%-10s %8s %8s %8s %9s %8s %8s %8s %9s"
    print(fmt % ("row", "out_us", "gw_us", "in_us", "total_us", "out_MB", "gw_MB", "in_MB", "rps"))
    for name, r in rows.items():
        total = sum(r[k] for k in PARTS)
        r["total"] = total
        print(fmt % (name, *("%.1f" % r[k] for k in PARTS), "%.1f" % total,
                     *("%.1f" % r[k + "_mb"] for k in PARTS), "%.0f" % r["rps"]))
    ratio = lambda a, b: "%.2f" % (a / b) if b else "-"
    for ref in ("envoy+gw", "haproxy+gw"):
        base = rows.get(ref)
        for name, r in rows.items():
            if base and name.startswith("agents"):
                print(f"{name}/{ref}: CPU per request {ratio(r['total'], base['total'])} "
                      f"(sidecars {ratio(r['out'] + r['in'], base['out'] + base['in'])}, "
                      f"gateway {ratio(r['gw'], base['gw'])})")


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "measure" and len(sys.argv) == 9:
        measure(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6:])
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
