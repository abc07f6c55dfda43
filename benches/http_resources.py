#!/usr/bin/env python3
"""CPU per request and memory of HTTP proxies and the agent, side by side.

Reuses the configs a kept run of ../shared/bench/anchors/http-proxy.sh
rendered (KEEP_WORK=1), so every proxy runs exactly the anchors' config, and
adds the agent: --agent-cmd, the candidate command http-proxy.sh gave the
anchor ({listen} its inbound listener, {backend} its application). For each, pinned to cpu1 beside the nginx backend
(wrk on cpu0, as in the shared method):

  idle RSS       resident memory of the proxy's processes after start
  RSS/conn       (RSS with N idle keep-alive connections open - idle) / N
  peak RSS       the processes' VmHWM after the load runs
  CPU us/req     proxy CPU time (utime+stime, /proc) / requests, wrk
                 keep-alive, 32 connections

Loopback only. Everything started is stopped by process group on exit.
"""
import argparse, os, shlex, signal, sys

from proxy_resources import hold, measure, raise_nofile, start_backend, wait_port, wrk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="kept run dir of the shared http-proxy scenario")
    ap.add_argument("--agent-cmd", required=True,
                    help="the agent's command line, with {listen} and {backend} (benches/http-proxy.sh's)")
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", "/tmp/bench-cache/envoy"))
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rows", default="envoy,haproxy,nginx,agent", help="comma-separated subset of rows")
    a = ap.parse_args()
    raise_nofile()
    w = a.workdir
    base = 18500
    backend = start_backend(w)
    rows = {}
    try:
        wait_port(base + 1)
        proxies = [
            ("envoy", [a.envoy, "-c", f"{w}/envoy.yaml", "--concurrency", "1", "--disable-hot-restart", "-l", "warn"], base + 11),
            ("haproxy", ["haproxy", "-db", "-f", f"{w}/haproxy.cfg"], base + 21),
            ("nginx", ["nginx", "-e", f"{w}/res-nginx.err", "-c", f"{w}/nginx-proxy.conf", "-g", "daemon off;"], base + 31),
            ("agent", shlex.split(a.agent_cmd.replace("{listen}", str(base + 41)).replace("{backend}", str(base + 1))),
             base + 41),
        ]
        wanted = a.rows.split(",")
        for name, cmd, port in [p for p in proxies if p[0] in wanted]:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows[name] = measure(name, cmd, port, w, a.conns, hold,
                                 [("req", lambda p: (wrk(f"http://127.0.0.1:{p}/", a.seconds), a.seconds))])
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait(5)
    print(f"\n-- resources ({a.conns} idle keep-alive connections; wrk -c32 {a.seconds}s; proxy and backend on cpu1)")
    print(f"{'row':<10} {'idle MB':>8} {'KB/conn':>8} {'peak MB':>8} {'us/req':>8} {'rps':>9}")
    for name, r in rows.items():
        print(f"{name:<10} {r['idle_mb']:>8.1f} {r['conn_kb']:>8.1f} {r['peak_mb']:>8.1f} {r['us_req']:>8.1f} "
              f"{r['rps_req']:>9.0f}")
    if {"agent", "envoy"} <= rows.keys():
        g, e = rows["agent"], rows["envoy"]
        print(f"agent/envoy: CPU per request {g['us_req'] / e['us_req']:.2f}, idle RSS {g['idle_mb'] / e['idle_mb']:.2f}, "
              f"peak RSS {g['peak_mb'] / e['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
