#!/usr/bin/env python3
"""CPU per request and memory of SNI-passthrough proxies, side by side.

Reuses the configs a kept run of ../shared/bench/anchors/sni-passthrough.sh
rendered (KEEP_WORK=1), so every proxy runs exactly the anchors' config, and
adds our gateway with the same routes. For each proxy, pinned to cpu1 beside
the TLS backend (wrk on cpu0, as in the shared method):

  idle RSS       resident memory of the proxy's processes after start
  RSS/conn       (RSS with N idle TLS connections open through it - idle) / N
  CPU us/req     proxy CPU time (utime+stime, /proc) / requests, wrk keep-alive
  CPU us/conn    the same with 'Connection: close' (new TCP + TLS per request)

Loopback only. Everything started is stopped by process group on exit.
"""
import argparse, asyncio, os, re, signal, ssl, sys

from proxy_resources import measure, raise_nofile, start_backend, wait_port, wrk

HOST = "svc-a.mesh.local"


async def hold(port, n, ca):
    ctx = ssl.create_default_context(cafile=ca)
    sem = asyncio.Semaphore(64)
    conns = []

    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOST)
            conns.append(w)

    await asyncio.gather(*(one() for _ in range(n)))
    return conns


def wrk_sni(port, seconds, close):
    extra = ["-H", "Connection: close"] if close else []
    return wrk(f"https://{HOST}:{port}/", seconds, *extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="kept run dir of the shared sni-passthrough scenario")
    ap.add_argument("--gateway", required=True, help="path to fedmesh-gateway")
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", "/tmp/bench-cache/envoy"))
    ap.add_argument("--pki", default="/tmp/bench-cache/pki")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rows", default="envoy,haproxy,nginx,gateway", help="comma-separated subset of rows")
    a = ap.parse_args()
    raise_nofile()
    w = a.workdir
    base = 18400
    hosts_line = f"127.0.0.1 {HOST} # fedmesh-sni-resources\n"
    added = False
    with open("/etc/hosts") as f:
        if not re.search(rf"^127\.0\.0\.1\s.*\b{re.escape(HOST)}\b", f.read(), re.M):
            with open("/etc/hosts", "a") as g:
                g.write(hosts_line)
            added = True
    backend = start_backend(w)
    rows = {}
    try:
        wait_port(base + 1)
        proxies = [
            ("envoy", [a.envoy, "-c", f"{w}/envoy.yaml", "--concurrency", "1", "--disable-hot-restart", "-l", "warn"], base + 11),
            ("haproxy", ["haproxy", "-db", "-f", f"{w}/haproxy.cfg"], base + 21),
            ("nginx", ["nginx", "-e", f"{w}/res-nginx.err", "-c", f"{w}/nginx-stream.conf", "-g", "daemon off;"], base + 31),
            ("gateway", [a.gateway, "--cluster", "bench", "--listen", f"127.0.0.1:{base + 41}", "--route",
                         f"svc-a.mesh.local=127.0.0.1:{base + 1}", "--route", f"svc-b.mesh.local=127.0.0.1:{base + 2}",
                         "--threads", "1", "--access-log", "off"], base + 41),
        ]
        wanted = a.rows.split(",")
        for name, cmd, port in [p for p in proxies if p[0] in wanted]:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            ca = os.path.join(a.pki, "ca.pem")
            rows[name] = measure(name, cmd, port, w, a.conns, lambda p, n: hold(p, n, ca), [
                ("req", lambda p: (wrk_sni(p, a.seconds, False), a.seconds)),
                ("conn", lambda p: (wrk_sni(p, a.seconds, True), a.seconds)),
            ])
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait(5)
        if added:
            with open("/etc/hosts") as f:
                kept = [l for l in f if not l.endswith("# fedmesh-sni-resources\n")]
            with open("/etc/hosts", "w") as f:
                f.writelines(kept)
    print(f"\n-- resources ({a.conns} idle TLS connections; wrk -c32 {a.seconds}s; proxy and backend on cpu1)")
    print(f"{'row':<10} {'idle MB':>8} {'KB/conn':>8} {'us/req':>8} {'us/conn':>8} {'rps keep':>9} {'rps close':>9}")
    for name, r in rows.items():
        print(f"{name:<10} {r['idle_mb']:>8.1f} {r['conn_kb']:>8.1f} {r['us_req']:>8.1f} {r['us_conn']:>8.1f} "
              f"{r['rps_req']:>9.0f} {r['rps_conn']:>9.0f}")
    if not {"gateway", "haproxy", "envoy"} <= rows.keys():
        return
    g, h, e = rows["gateway"], rows["haproxy"], rows["envoy"]
    print(f"gateway/haproxy CPU per request: {g['us_req'] / h['us_req']:.2f} (target <= 1); "
          f"per new connection: {g['us_conn'] / h['us_conn']:.2f}")
    print(f"gateway idle RSS {g['idle_mb']:.1f} MB (target < 10), {g['conn_kb']:.1f} KB per idle connection (target < 30); "
          f"envoy {e['idle_mb']:.1f} MB, {e['conn_kb']:.1f} KB")


if __name__ == "__main__":
    main()
