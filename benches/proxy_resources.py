#!/usr/bin/env python3
"""What sni_resources.py and http_resources.py share: starting a proxy
pinned to cpu1 in its own process group, its memory and CPU from /proc, and
one proxy's measurement (idle RSS, RSS per idle connection, peak RSS, CPU
per request under each load)."""
import asyncio, os, re, resource, signal, socket, subprocess, time

CLK = os.sysconf("SC_CLK_TCK")


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def raise_nofile():
    """Lifts this process's open-file limit to the hard limit (at most
    65,536), for the idle connections it holds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def start_backend(work):
    """The anchors' nginx backend of the kept run in `work`, started again."""
    return start(["nginx", "-e", f"{work}/res-backend.err", "-c", f"{work}/backend.conf", "-g", "daemon off;"],
                 open(os.path.join(work, "res-backend.log"), "w"))


def start(cmd, log):
    return subprocess.Popen(["taskset", "-c", "1"] + cmd, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def group_pids(pgid):
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def status_kb(pids, field):
    """The sum of a /proc/PID/status field (VmRSS, VmHWM) over pids, kB."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                m = re.search(rf"{field}:\s+(\d+) kB", f.read())
                total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def rss_kb(pids):
    return status_kb(pids, "VmRSS")


def cpu_s(pids):
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                t += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return t / CLK


async def hold(port, n, host="127.0.0.1"):
    """N idle keep-alive connections to port, each having made one request
    (Host: host) answered 200."""
    sem = asyncio.Semaphore(64)
    conns = []

    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"port {port} answered {head[:60]!r}")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await r.readexactly(int(m.group(1)) if m else 0)
            conns.append(w)

    await asyncio.gather(*(one() for _ in range(n)))
    return conns


def wrk(url, seconds, *extra):
    """Requests wrk (one thread on cpu0, 32 connections) completed against
    url in `seconds`; exits if any failed."""
    cmd = ["taskset", "-c", "0", "wrk", "-t1", "-c32", f"-d{seconds}s", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m or "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk failed against {url}:\n{out}")
    return int(m.group(1))


def measure(name, cmd, port, work, conns, hold, loads):
    """Starts `cmd` (listening on `port`), then: its idle RSS; its RSS with
    `conns` idle connections that `hold(port, conns)` (a coroutine) opens
    and returns (writers); for each (key, run) of `loads`, its CPU per
    request while `run(port)` (returning requests, seconds) loads it; its
    peak RSS (VmHWM) at the end. Stops it by process group."""
    log = open(os.path.join(work, f"res-{name}.log"), "w")
    p = start(cmd, log)
    try:
        wait_port(port)
        time.sleep(1.0)
        idle = rss_kb(group_pids(p.pid))
        loop = asyncio.new_event_loop()
        held = loop.run_until_complete(hold(port, conns))
        time.sleep(0.5)
        with_conns = rss_kb(group_pids(p.pid))
        for w in held:
            w.close()
        loop.run_until_complete(asyncio.sleep(0.5))
        loop.close()
        row = {"idle_mb": idle / 1024, "conn_kb": (with_conns - idle) / conns}
        for key, run in loads:
            c0 = cpu_s(group_pids(p.pid))
            n, seconds = run(port)
            c1 = cpu_s(group_pids(p.pid))
            row[f"us_{key}"] = (c1 - c0) * 1e6 / n
            row[f"rps_{key}"] = n / seconds
        row["peak_mb"] = status_kb(group_pids(p.pid), "VmHWM") / 1024
        return row
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
