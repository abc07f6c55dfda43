#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets to fuzz/seeds/<target>/ (a few
valid inputs each, in the targets' input formats; see each target's doc
comment). policy_yaml also reads mesh-core/tests/testdata/policy directly.

    python3 fuzz/make_seeds.py      # needs openssl for the trust record's certificate
"""
import base64, hashlib, hmac, json, os, shutil, struct, subprocess, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def js(v):
    return json.dumps(v, separators=(",", ":"))


# --- proxy_v2: control byte, then the bytes of the connection ------------
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
HELLO = b"\x16\x03\x01\x00\x05hello"


def v2(cmd, fam, body):
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack(">H", len(body)) + body


tcp4 = bytes([198, 51, 100, 7, 203, 0, 113, 1]) + struct.pack(">HH", 40000, 15443)
tcp6 = bytes(range(16)) + bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]) + struct.pack(">HH", 1, 2)
tlv = b"\x03\x00\x04abcd" + b"\xea\x00\x05vpc-1"
seeds = {
    "tcp4": v2(1, 0x11, tcp4) + HELLO,
    "tcp6": v2(1, 0x21, tcp6) + HELLO,
    "tcp4_tlv": v2(1, 0x11, tcp4 + tlv) + HELLO,
    "local": v2(0, 0x00, b"") + HELLO,
    "local_addrs": v2(0, 0x11, tcp4),
    "udp4": v2(1, 0x12, tcp4),
    "unix": v2(1, 0x31, bytes(216)),
    "unspec": v2(1, 0x00, b"\x00" * 4),
    "truncated": v2(1, 0x11, tcp4)[:20],
    "v1": b"PROXY TCP4 198.51.100.7 203.0.113.1 40000 15443\r\n" + HELLO,
    "hello": HELLO,
}
for i, (name, b) in enumerate(seeds.items()):
    write("proxy_v2", name, bytes([i * 17 % 256 & 0x7f]) + b)
write("proxy_v2", "tcp4_small_bound", bytes([0x83]) + seeds["tcp4_tlv"])

# --- registry_value: records separated by 0xff ---------------------------
# A record: selector byte (template index | 0x20 alt | 0x40 raw key | 0x80 delete), value.
T = {n: i for i, n in enumerate([
    "clusters", "heartbeats", "endpoints", "endpoint-leases", "exports",
    "VirtualService", "DestinationRule", "Sidecar", "AuthorizationPolicy",
    "PeerAuthentication", "RequestAuthentication", "TrafficWeights", "trust",
    "weights", "traffic", "drain", "load", "probes", "subscribers", "tokens",
    "operator-tokens", "rbac", "audit", "leader", "future", "bad-endpoint"])}


def rec(template, value, alt=False, delete=False):
    sel = T[template] | (0x20 if alt else 0) | (0x80 if delete else 0)
    return bytes([sel]) + (value.encode() if isinstance(value, str) else value)


def raw(key, value):
    return bytes([0x40]) + key.encode() + b"\n" + value.encode()


loc = {"region": "us-east", "zone": "us-east-1a"}
cluster = lambda c: {"name": c, "locality": loc, "network": "net-" + c,
                     "gateways": ["203.0.113.1:15443"], "trust_domain": "cluster.local"}
endpoint = lambda c: {"id": "r1", "service": {"namespace": "default", "name": "reviews"}, "cluster": c,
                      "address": "10.0.0.1", "ports": [{"number": 9080, "protocol": "http"}],
                      "locality": loc, "labels": {"version": "v1"}, "health": "healthy",
                      "identity": "spiffe://cluster.local/ns/default/sa/reviews"}
meta = lambda n: {"name": n, "namespace": "default"}
NET = "networking.istio.io/v1"
SEC = "security.istio.io/v1"
policies = {
    "VirtualService": {"apiVersion": NET, "kind": "VirtualService", "metadata": meta("reviews"), "spec": {
        "hosts": ["reviews"], "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}, "uri": {"prefix": "/reviews"}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
             "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,connect-failure"},
             "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 0.5}}}},
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                       {"destination": {"host": "reviews", "subset": "v3"}, "weight": 10}],
             "timeout": "5s"}]}},
    "DestinationRule": {"apiVersion": NET, "kind": "DestinationRule", "metadata": meta("reviews"), "spec": {
        "host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"},
                                             "connectionPool": {"tcp": {"maxConnections": 100}},
                                             "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s"}},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}},
    "Sidecar": {"apiVersion": NET, "kind": "Sidecar", "metadata": meta("reviews"), "spec": {
        "egress": [{"hosts": ["./*", "istio-system/*"]}]}},
    "AuthorizationPolicy": {"apiVersion": SEC, "kind": "AuthorizationPolicy", "metadata": meta("reviews"), "spec": {
        "selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW", "rules": [
            {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/productpage"]}}],
             "to": [{"operation": {"methods": ["GET"], "paths": ["/reviews/*"]}}]}]}},
    "PeerAuthentication": {"apiVersion": SEC, "kind": "PeerAuthentication", "metadata": meta("reviews"), "spec": {
        "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9080": {"mode": "PERMISSIVE"}}}},
    "RequestAuthentication": {"apiVersion": SEC, "kind": "RequestAuthentication", "metadata": meta("reviews"), "spec": {
        "jwtRules": [{"issuer": "https://issuer.example", "jwks": js({"keys": [{"kty": "oct", "kid": "hs", "k": "c2VjcmV0"}]})}]}},
    "TrafficWeights": {"apiVersion": "fedmesh.io/v1", "kind": "TrafficWeights", "metadata": meta("reviews"), "spec": {
        "host": "reviews", "clusters": {"c1": 80, "c2": 20}}},
}


def trust_record():
    try:
        with tempfile.TemporaryDirectory() as d:
            key, crt = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", key, "-out", crt, "-days", "3650", "-subj", "/CN=fedmesh fuzz root"],
                           check=True, capture_output=True)
            der = subprocess.run(["openssl", "x509", "-in", crt, "-outform", "DER"], check=True, capture_output=True).stdout
            pem = open(crt).read()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"roots": [{"cert_pem": pem}], "signing": hashlib.sha256(der).hexdigest()}


values = [
    rec("clusters", js(cluster("c1"))),
    rec("clusters", js(cluster("c2")), alt=True),
    rec("heartbeats", js({"cluster": "c1", "since_unix_ms": 1749999990000, "replica": "replica-1"})),
    rec("endpoints", js(endpoint("c1"))),
    rec("endpoints", js(dict(endpoint("c2"), lease_ttl_ms=15000)), alt=True),
    rec("endpoint-leases", js({"since_unix_ms": 1749999990000, "replica": "replica-1"})),
    rec("exports", js({"service": {"namespace": "default", "name": "reviews"}, "cluster": "c1"})),
    rec("weights", js({"callers": {"c1": {"c1": 7000, "c2": 3000}}, "memory": {
        "c1": {"healthy_since_ms": 1749999000000, "admission": 1.0, "correcting": False}},
        "computed_unix_ms": 1749999999000, "term": 3})),
    rec("traffic", js({"by": "cluster", "weights": {"c1": 1, "c2": 3}, "set_by": "alice",
                       "set_unix_ms": 1749999999000, "expires_unix_ms": 1750000999000, "forced": False})),
    rec("drain", js({"by": "alice", "since_unix_ms": 1749999999000}), alt=True),
    rec("load", js({"inbound_qps": 12.5, "capacity_qps": 100.0, "outbound": {"default/ratings": 3.0},
                    "at_unix_ms": 1749999999000})),
    rec("probes", js({"clusters": {"c2": {"gateway": True, "unreachable": ["default/ratings"]}},
                      "at_unix_ms": 1749999999000})),
    rec("subscribers", js({"node_id": "agent~c1~reviews", "cluster": "c1", "kind": 1, "sent_version": 7,
                           "acked_version": 7, "acked_unix_ms": 1749999999000})),
    rec("tokens", js({"cluster": "c1", "identity": "spiffe://cluster.local/ns/default/sa/reviews",
                      "expires_unix_ms": 1750000999000, "single_use": True})),
    rec("operator-tokens", js({"name": "alice", "expires_unix_ms": 1750000999000, "created_by": "root"})),
    rec("rbac", js({"roles": ["viewer", "operator"], "set_by": "root", "set_unix_ms": 1749999999000})),
    rec("audit", js({"unix_ms": 1749999999000, "action": "issue", "actor": "root",
                     "subject": "spiffe://cluster.local/ns/default/sa/reviews", "detail": "24h"})),
    rec("leader", js({"replica": "replica-1", "since_unix_ms": 1749999999000})),
]
values += [rec(k, js(v)) for k, v in policies.items()]
tr = trust_record()
if tr:
    values.append(rec("trust", js(tr)))
    write("registry_value", "trust", rec("trust", js(tr)))
for i, v in enumerate(values):
    write("registry_value", "one_%02d" % i, v)
write("registry_value", "all", b"\xff".join(values))
write("registry_value", "put_delete", b"\xff".join([values[0], values[3], rec("clusters", "", delete=True),
                                                      rec("endpoints", js(endpoint("c2"))), rec("endpoints", "{", alt=True)]))
write("registry_value", "raw_keys", b"\xff".join([
    raw("/fedmesh/v1/clusters/c3", js(cluster("c3"))),
    raw("/fedmesh/v1/policy/VirtualService/other/reviews", js(policies["VirtualService"])),
    raw("/fedmesh/v1/endpoints/default/reviews", "{}"),
    raw("/other/key", "x")]))

# --- discovery_message: control byte, then DiscoveryResponse bytes ------
# A minimal protobuf writer (field numbers from mesh-api/proto/fedmesh/v1).
def varint(n):
    out = b""
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def f_len(num, payload):
    payload = payload.encode() if isinstance(payload, str) else payload
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def f_int(num, v):
    return varint(num << 3) + varint(v & (2**64 - 1))


def pb_locality():
    return f_len(1, "us-east") + f_len(2, "us-east-1a")


def pb_service(name="reviews"):
    return f_len(1, "default") + f_len(2, name)


def pb_cluster(c):
    return (f_len(1, c) + f_len(2, pb_locality()) + f_len(3, "net-" + c) + f_len(4, "203.0.113.%d:15443" % (1 if c == "c1" else 2))
            + f_len(5, "cluster.local"))


def pb_endpoint(c, id="r1", name="reviews", version="v1"):
    port = f_int(2, 9080) + f_len(3, "http") + f_len(1, "http")
    return (f_len(1, id) + f_len(2, pb_service(name)) + f_len(3, c) + f_len(4, "10.0.%d.1" % (1 if c == "c1" else 2))
            + f_len(5, port) + f_len(6, f_len(1, "version") + f_len(2, version)) + f_len(7, pb_locality())
            + f_int(8, 1) + f_len(9, "spiffe://cluster.local/ns/default/sa/" + name))


def pb_policy(doc, rev):
    ref = f_len(1, doc["kind"]) + f_len(2, "default") + f_len(3, doc["metadata"]["name"])
    return f_len(1, ref) + f_len(2, js(doc)) + f_int(3, rev)


def pb_cluster_state(c):
    return f_len(1, pb_cluster(c)) + f_int(2, 1) + f_int(3, 1749999999000)


snapshot = (f_int(1, 7) + f_len(2, f_int(1, 0) + f_int(2, 1))
            + f_len(3, pb_cluster_state("c1")) + f_len(3, pb_cluster_state("c2"))
            + f_len(5, pb_endpoint("c1")) + f_len(5, pb_endpoint("c2", "r2", version="v2"))
            + f_len(5, pb_endpoint("c1", "p1", "productpage"))
            + f_len(7, f_len(1, pb_service()) + f_len(2, "c1") + f_int(3, 1))
            + b"".join(f_len(8, pb_policy(d, 5)) for d in policies.values())
            + f_len(11, f_len(1, pb_service()) + f_len(2, f_len(1, "c1") + f_len(2, f_len(1, "c1") + f_int(2, 7000))
                                                       + f_len(2, f_len(1, "c2") + f_int(2, 3000)))))
if tr:
    snapshot += f_len(10, f_len(1, tr["roots"][0]["cert_pem"]) + f_len(2, tr["signing"]))
delta = (f_int(1, 8) + f_len(4, "c2") + f_len(6, f_len(1, pb_service()) + f_len(2, "c1") + f_len(3, "r1"))
         + f_len(9, f_len(1, "Sidecar") + f_len(2, "default") + f_len(3, "reviews"))
         + f_len(12, pb_service()))
write("discovery_message", "snapshot", b"\x00" + snapshot)
write("discovery_message", "delta", b"\x00" + delta)
write("discovery_message", "stream", b"\x01" + varint(len(snapshot)) + snapshot + varint(len(delta)) + delta)
sub = f_len(1, f_len(1, "agent~c1~reviews") + f_len(2, "c1") + f_int(3, 1) + f_len(4, "default")
            + f_len(5, f_len(1, "app") + f_len(2, "reviews")))
write("discovery_message", "request_subscribe", b"\x00" + sub)
write("discovery_message", "request_nack", b"\x00" + f_len(3, f_int(1, 7) + f_len(2, "1 invalid item(s) skipped")))

# --- jwt_header -----------------------------------------------------------
HS = b"fedmesh-fuzz-hs256-secret-0123456789abcdef"
HS512 = b"fedmesh-fuzz-hs512-secret-0123456789abcdef-0123456789abcdef"
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def signed(h, c, key=HS, alg=hashlib.sha256):
    inp = b64(js(h).encode()) + "." + b64(js(c).encode())
    return inp + "." + b64(hmac.new(key, inp.encode(), alg).digest())


claims = {"iss": "https://issuer.example", "sub": "alice", "exp": 4102444800, "iat": 1700000000}
claims_b = {"iss": "https://other.example", "sub": "bob", "aud": ["fedmesh"], "exp": 4102444800, "nbf": 1700000000}
hdr = {"alg": "HS256", "typ": "JWT", "kid": "hs"}
write("jwt_header", "raw_valid", b"\x00" + signed(hdr, claims).encode())
write("jwt_header", "raw_valid_b", b"\x08" + signed(hdr, claims_b).encode())
write("jwt_header", "raw_hs512", b"\x00" + signed({"alg": "HS512", "kid": "hs512"}, claims, HS512, hashlib.sha512).encode())
write("jwt_header", "raw_garbage", b"\x00not.a.jwt")
write("jwt_header", "parts_rs256", b"\x01" + js({"alg": "RS256", "kid": "rsa"}).encode() + b"\x00" + js(claims).encode() + b"\x00" + bytes(256))
write("jwt_header", "parts_none", b"\x01" + js({"alg": "none"}).encode() + b"\x00" + js(claims).encode() + b"\x00")
write("jwt_header", "parts_es256", b"\x01" + js({"alg": "ES256", "kid": "ec"}).encode() + b"\x00" + js(claims).encode() + b"\x00" + bytes(64))
write("jwt_header", "signed", b"\x02" + js(hdr).encode() + b"\x00" + js(claims).encode())
write("jwt_header", "signed_nokid", b"\x02" + js({"alg": "HS256"}).encode() + b"\x00" + js(claims).encode())
write("jwt_header", "signed_b", b"\x0a" + js(hdr).encode() + b"\x00" + js(claims_b).encode())
write("jwt_header", "signed_512", b"\x06" + js({"alg": "HS512", "kid": "hs512"}).encode() + b"\x00" + js(claims).encode())
write("jwt_header", "signed_expired", b"\x02" + js(hdr).encode() + b"\x00" + js(dict(claims, exp=1000)).encode())
write("jwt_header", "own_jwks", b"\x03" + js({"keys": [{"kty": "oct", "kid": "hs", "k": b64(HS)},
                                                      {"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"},
                                                      {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}).encode())
print("seeds written to", OUT)
