#!/usr/bin/env python3
"""Exports a service from a cluster: `Registration/SetExport` on the
federation, as the operator of a meshctl configuration (benches/mesh-gateway.sh
gives it the federation's --bootstrap-admin file).

meshctl has no command for it (a Kubernetes cluster exports with the
`fedmesh.io/export` label or a ServiceExport, which the federation's
Kubernetes discovery turns into this call; the demo calls it in process),
and a gateway routes only exported services. So this is the one gRPC call
made by hand: the request is encoded here (fedmesh.v1.SetExportRequest, three
fields) and sent with curl over HTTP/2 and TLS, with the operator's
certificate and the federation's CA from the configuration. The answer's
grpc-status must be 0.

Usage: set_export.py CONFIG CLUSTER NAMESPACE SERVICE
"""
import os, re, subprocess, sys, tempfile, urllib.parse


def context(path):
    """The current context's server and PEM blocks, from meshctl's YAML
    (PyYAML if present, else the few keys meshctl writes)."""
    text = open(path).read()
    try:
        import yaml
        cfg = yaml.safe_load(text)
        ctxs = cfg["contexts"]
        cur = cfg.get("current-context") or ctxs[0]["name"]
        return next(c for c in ctxs if c["name"] == cur)
    except ImportError:
        pass
    # meshctl writes one context with block scalars (`key: |` then indented lines).
    ctx, key, block = {}, None, []
    for line in text.splitlines() + ["end:"]:
        if key is not None and (line.startswith("    ") or not line.strip()):
            block.append(line[4:])
            continue
        if key is not None:
            ctx[key] = "\n".join(block).strip() + "\n"
            key, block = None, []
        m = re.match(r"^(?:- |  )([a-z-]+):\s*(.*)$", line)
        if m:
            if m.group(2).startswith("|"):
                key = m.group(1)
            else:
                ctx[m.group(1)] = m.group(2).strip("'\"")
    return ctx


def field(num, wire, payload):
    """One protobuf field: a length-delimited one (wire 2) or a varint (wire 0, < 128)."""
    if wire == 0:
        return bytes([num << 3, payload])
    assert len(payload) < 128
    return bytes([(num << 3) | 2, len(payload)]) + payload


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[-1])
    cfg, cluster, ns, svc = sys.argv[1:]
    ctx = context(cfg)
    # SetExportRequest { ServiceKey service = 1 { namespace = 1; name = 2 }; string cluster = 2; bool exported = 3 }
    key = field(1, 2, ns.encode()) + field(2, 2, svc.encode())
    msg = field(1, 2, key) + field(2, 2, cluster.encode()) + field(3, 0, 1)
    frame = b"\0" + len(msg).to_bytes(4, "big") + msg
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for k in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
            files[k] = os.path.join(d, k + ".pem")
            fd = os.open(files[k], os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(ctx[k])
        with open(os.path.join(d, "req"), "wb") as f:
            f.write(frame)
        hdrs = os.path.join(d, "headers")
        url = ctx["server"].rstrip("/") + "/fedmesh.v1.Registration/SetExport"
        r = subprocess.run(
            ["curl", "-sS", "--http2", "--max-time", "10",
             "--cacert", files["certificate-authority-data"],
             "--cert", files["client-certificate-data"], "--key", files["client-key-data"],
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             "--data-binary", "@" + os.path.join(d, "req"), "-D", hdrs, "-o", os.devnull, url],
            capture_output=True, text=True)
        got = open(hdrs).read() if os.path.exists(hdrs) else ""
    # grpc-status comes in the trailers (curl writes them with the headers),
    # or in the headers of a trailers-only answer.
    status = re.findall(r"(?im)^grpc-status:\s*(\d+)", got)
    message = [urllib.parse.unquote(m) for m in re.findall(r"(?im)^grpc-message:\s*(.*?)\s*$", got)]
    if r.returncode != 0 or status != ["0"]:
        sys.exit(f"SetExport {ns}/{svc} from {cluster} failed: curl exit {r.returncode} {r.stderr.strip()} "
                 f"grpc-status {status} {message}")
    print(f"exported {ns}/{svc} from {cluster}")


if __name__ == "__main__":
    main()
