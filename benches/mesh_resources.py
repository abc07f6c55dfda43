#!/usr/bin/env python3
"""CPU per request and memory of the mesh path's proxy pairs, side by side.

Reuses the configs a kept run of ../shared/bench/anchors/mesh-mtls.sh
rendered (KEEP_WORK=1), so every pair runs exactly the anchors' config, and
adds the fedmesh agents: --pair-cmd, the candidate command
benches/mesh-mtls.sh gave the anchor ({listen} the frontend agent's
outbound listener, {backend} the app, {inbound} the backend agent's inbound
listener). Each pair runs as one process group pinned to cpu1 beside the
nginx app (wrk on cpu0, as in the shared method); the figures are the
pair's, both proxies together:

  idle RSS       resident memory of both proxies after start
  RSS/conn       (RSS with N idle keep-alive client connections open - idle) / N
                 (the hop between the proxies stays pooled)
  peak RSS       both processes' VmHWM after the load runs
  CPU us/req     both proxies' CPU time (utime+stime, /proc) / requests,
                 wrk keep-alive, 32 connections

Loopback only. Everything started is stopped by process group on exit.
"""
import argparse, asyncio, os, shlex, signal, sys

from proxy_resources import hold, measure, raise_nofile, start_backend, wait_port, wrk

HOST = "backend.default.svc.cluster.local"
BASE = 18700


def pair(a, b):
    """Two commands as one process group: a shell that waits for both."""
    return ["bash", "-c", f"trap 'kill 0' TERM; {shlex.join(a)} & {shlex.join(b)} & wait"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="kept run dir of the shared mesh-mtls scenario")
    ap.add_argument("--pair-cmd", required=True,
                    help="the agents' command, with {listen}, {backend} and {inbound} (benches/mesh-mtls.sh's)")
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", "/tmp/bench-cache/envoy"))
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rows", default="envoy,haproxy,nginx,agents", help="comma-separated subset of rows")
    a = ap.parse_args()
    raise_nofile()
    w = a.workdir
    backend = start_backend(w)
    envoy = lambda conf, base_id: [a.envoy, "-c", f"{w}/{conf}", "--concurrency", "1", "--disable-hot-restart",
                                   "--base-id", str(base_id), "-l", "warn"]
    nginx = lambda conf, err: ["nginx", "-e", f"{w}/{err}", "-c", f"{w}/{conf}", "-g", "daemon off;"]
    agents = (a.pair_cmd.replace("{listen}", str(BASE + 41)).replace("{backend}", str(BASE + 1))
              .replace("{inbound}", str(BASE + 42)))
    rows = {}
    try:
        wait_port(BASE + 1)
        pairs = [
            ("envoy", pair(envoy("envoy-in.yaml", 71), envoy("envoy-out.yaml", 72)), BASE + 11),
            ("haproxy", pair(["haproxy", "-db", "-f", f"{w}/haproxy-in.cfg"],
                             ["haproxy", "-db", "-f", f"{w}/haproxy-out.cfg"]), BASE + 21),
            ("nginx", pair(nginx("nginx-in.conf", "res-nginx-in.err"), nginx("nginx-out.conf", "res-nginx-out.err")),
             BASE + 31),
            ("agents", ["bash", "-c", f"exec {agents}"], BASE + 41),
        ]
        wanted = a.rows.split(",")
        for name, cmd, port in [p for p in pairs if p[0] in wanted]:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows[name] = measure(name, cmd, port, w, a.conns, hold_settled,
                                 [("req", lambda p: (wrk(f"http://127.0.0.1:{p}/", a.seconds, "-H", f"Host: {HOST}"), a.seconds))])
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait(5)
    print(f"\n-- pair resources ({a.conns} idle keep-alive client connections; wrk -c32 {a.seconds}s; "
          "both proxies and the app on cpu1)")
    print(f"{'row':<10} {'idle MB':>8} {'KB/conn':>8} {'peak MB':>8} {'us/req':>8} {'rps':>9}")
    for name, r in rows.items():
        print(f"{name:<10} {r['idle_mb']:>8.1f} {r['conn_kb']:>8.1f} {r['peak_mb']:>8.1f} {r['us_req']:>8.1f} "
              f"{r['rps_req']:>9.0f}")
    for base in ("haproxy", "envoy"):
        if {"agents", base} <= rows.keys():
            g, e = rows["agents"], rows[base]
            print(f"agents/{base}: CPU per request {g['us_req'] / e['us_req']:.2f}, "
                  f"idle RSS {g['idle_mb'] / e['idle_mb']:.2f}, peak RSS {g['peak_mb'] / e['peak_mb']:.2f}")


async def hold_settled(port, n):
    """hold(), after the pair answers (the agents settle: enrollment, the
    backend's endpoint reaching the frontend)."""
    for _ in range(100):
        try:
            for w in await hold(port, 1, HOST):
                w.close()
            break
        except (SystemExit, OSError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.2)
    return await hold(port, n, HOST)


if __name__ == "__main__":
    main()
