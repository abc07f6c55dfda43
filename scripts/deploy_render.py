#!/usr/bin/env python3
"""Renders and checks deploy/'s Kubernetes manifests offline; driven by
scripts/validate-deploy.sh, which installs what it imports.

  helm CHART OUT [--values FILE]... [--set-json JSON]... [--expect-fail TEXT]
      Render the chart with the real Helm SDK (helm-python-sdk: Helm's Go
      library in the wheel), CRDs from crds/ included, as `helm template
      --include-crds` does; also lint it. --expect-fail: the render must be
      refused with a message containing TEXT.
  kustomize LIB DIR OUT
      Build DIR with the real kustomize (the Go library libpykustomize.so
      from the pykustomize wheel, loaded with ctypes).
  validate K8S_VERSION[,K8S_VERSION...] FILE... [--crds FILE] [--expect-invalid TEXT]
      Every object against the Kubernetes OpenAPI schemas of each version
      shipped in kubernetes-validate, strict (unknown fields refused); a
      custom resource against the openAPIV3Schema of its CRD, found in the
      same files or in --crds FILE; a kind known to neither is an error.
      CRDs also against the API server's rules these could break (name,
      one stored version, structural schema, status subresource).
  same A B
      The objects of A and B are the same once Helm's own labels and
      annotations are dropped (the kustomize base against the chart).
  sidecar FILE [TEMPLATE_FILE]
      Every Deployment in a namespace labelled fedmesh.io/inject=enabled has
      the fedmesh-agent sidecar, and what was added equals the template in
      the fedmesh-sidecar-injector ConfigMap (in FILE or TEMPLATE_FILE).
  break FILE OUT KIND NAME PATH VALUE
      Copy FILE to OUT with one field of one object set (VALUE as JSON; the
      literal DELETE removes it): material for a negative check.
"""

import ctypes
import json
import re
import sys

import yaml


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def dump_all(docs, path):
    with open(path, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)


def kn(d):
    md = d.get("metadata") or {}
    ns = md.get("namespace")
    return f"{d.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


# -- helm --------------------------------------------------------------------


def cmd_helm(args):
    import helm_python as helm

    chart_dir, out = args[0], args[1]
    values, expect_fail, i = {}, None, 2
    while i < len(args):
        flag, arg = args[i], args[i + 1]
        if flag == "--values":
            with open(arg) as f:
                merge(values, yaml.safe_load(f) or {})
        elif flag == "--set-json":
            merge(values, json.loads(arg))
        elif flag == "--expect-fail":
            expect_fail = arg
        else:
            sys.exit(f"deploy_render.py helm: unknown flag {flag}")
        i += 2
    with helm.Chart.load(chart_dir) as chart:
        try:
            rendered = chart.render(values, name="fedmesh", namespace="fedmesh-system", is_install=True)
        except helm.HelmError as e:
            if expect_fail is not None and expect_fail in str(e):
                print(f"  refused as expected: {first_line(str(e), expect_fail)}")
                return 0
            print(f"FAIL helm render: {e}")
            return 1
        if expect_fail is not None:
            print(f"FAIL helm rendered values that should have been refused ({expect_fail})")
            return 1
        docs = []
        for crd in chart.crds:
            docs += [d for d in yaml.safe_load_all(crd["data"]) if d]
        for name in sorted(rendered):
            if name.endswith(".yaml"):
                docs += [d for d in yaml.safe_load_all(rendered[name]) if d]
    lint = helm.lint(chart_dir, values=values, strict=True, namespace="fedmesh-system")
    bad = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2] + list(lint.get("errors") or [])
    if bad:
        print(f"FAIL helm lint: {bad}")
        return 1
    dump_all(docs, out)
    print(f"  helm {helm.helm_sdk_version()}: {len(docs)} objects -> {out} (lint clean)")
    return 0


def merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v


def first_line(text, needle):
    for line in text.splitlines():
        if needle in line:
            return line.strip()
    return text.splitlines()[0]


# -- kustomize ---------------------------------------------------------------


def cmd_kustomize(args):
    lib_path, kdir, out = args
    lib = ctypes.CDLL(lib_path)
    lib.pykustomize_build.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.pykustomize_build.restype = ctypes.c_int
    lib.pykustomize_last_error.restype = ctypes.c_void_p
    lib.pykustomize_version_string.restype = ctypes.c_void_p
    lib.pykustomize_free.argtypes = [ctypes.c_void_p]
    # kustomize's defaults, as `kustomize build` runs: files only from
    # within the kustomization's root, legacy (kind) order, no plugins.
    opts = {
        "load_restrictions": 0,
        "reorder": "legacy",
        "add_managedby_label": False,
        "enable_plugins": False,
        "enable_helm": False,
        "helm_command": "",
    }
    result = ctypes.c_void_p()
    rc = lib.pykustomize_build(kdir.encode(), json.dumps(opts).encode(), ctypes.byref(result))
    if rc != 0:
        err = lib.pykustomize_last_error()
        print(f"FAIL kustomize build {kdir}: {ctypes.string_at(err).decode() if err else 'unknown error'}")
        return 1
    text = ctypes.string_at(result.value).decode()
    lib.pykustomize_free(result)
    with open(out, "w") as f:
        f.write(text)
    version = ctypes.string_at(lib.pykustomize_version_string()).decode()
    print(f"  kustomize ({version}): {len(load_all(out))} objects -> {out}")
    return 0


# -- validate ----------------------------------------------------------------


def crd_schemas(docs):
    """(group, version, kind) -> (openAPIV3Schema, scope) of every served
    version of every CRD in docs."""
    out = {}
    for d in docs:
        if d.get("kind") == "CustomResourceDefinition":
            spec = d["spec"]
            for v in spec["versions"]:
                if v.get("served"):
                    schema = (v.get("schema") or {}).get("openAPIV3Schema") or {}
                    out[(spec["group"], v["name"], spec["names"]["kind"])] = (schema, spec["scope"])
    return out


def cmd_validate(args):
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate import utils as kv

    opts = {"--expect-invalid": None, "--crds": None}
    for flag in opts:
        if flag in args:
            i = args.index(flag)
            opts[flag] = args[i + 1]
            args = args[:i] + args[i + 2:]
    expect_invalid = opts["--expect-invalid"]
    versions, files = args[0].split(","), args[1:]
    all_docs = {f: load_all(f) for f in files}
    more = load_all(opts["--crds"]) if opts["--crds"] else []
    crds = crd_schemas([d for docs in all_docs.values() for d in docs] + more)
    errors, counts = [], {}
    for f, docs in all_docs.items():
        for d in docs:
            where = f"{f}: {kn(d)}"
            if d.get("kind") == "CustomResourceDefinition":
                errors += [f"{where}: {e}" for e in crd_rules(d)]
            for version in versions:
                try:
                    kubernetes_validate.validate(d, version, strict=True)
                    counts["schema"] = counts.get("schema", 0) + 1
                    continue
                except kv.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    errors.append(f"{where}: {path}: {e.message} (Kubernetes {version})")
                    continue
                except kv.SchemaNotFoundError:
                    pass
                # Not a built-in kind: a custom resource of one of our CRDs?
                group, _, ver = d.get("apiVersion", "").rpartition("/")
                found = crds.get((group, ver, d.get("kind")))
                if found is None:
                    errors.append(
                        f"{where}: no Kubernetes {version} schema and no CRD for {d.get('apiVersion')} {d.get('kind')}"
                    )
                    continue
                schema, scope = found
                try:
                    body = {k: v for k, v in d.items() if k not in ("apiVersion", "kind", "metadata")}
                    jsonschema.Draft7Validator(schema).validate(body)
                    # The metadata, as any object's ObjectMeta.
                    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": d.get("metadata") or {}}
                    kubernetes_validate.validate(meta, version, strict=True)
                    if not (d.get("metadata") or {}).get("name"):
                        raise jsonschema.ValidationError("metadata.name is required")
                    if scope == "Namespaced" and not d["metadata"].get("namespace"):
                        raise jsonschema.ValidationError("a namespaced custom resource without metadata.namespace")
                    counts["custom resource"] = counts.get("custom resource", 0) + 1
                except (jsonschema.ValidationError, kv.ValidationError) as e:
                    errors.append(f"{where}: {e.message}")
    if expect_invalid is not None:
        hits = [e for e in errors if expect_invalid in e]
        if hits:
            print(f"  refused as expected: {hits[0]}")
            return 0
        print(f"FAIL the validator accepted what it should refuse ({expect_invalid}); errors: {errors}")
        return 1
    for e in errors:
        print(f"FAIL {e}")
    n = sum(len(docs) for docs in all_docs.values())
    detail = f"{counts.get('schema', 0)} checks against Kubernetes' schemas"
    if counts.get("custom resource"):
        detail += f", {counts['custom resource']} of custom resources against their CRD's"
    print(
        f"  {'INVALID' if errors else 'valid'}: {n} objects, Kubernetes {', '.join(versions)}"
        f" ({detail}): {' '.join(files)}"
    )
    return 1 if errors else 0


def crd_rules(d):
    """Rules the API server applies to a CRD beyond its OpenAPI schema, the
    ones these CRDs could break."""
    spec, errs = d["spec"], []
    names = spec["names"]
    if d["metadata"]["name"] != f"{names['plural']}.{spec['group']}":
        errs.append(f"metadata.name must be {names['plural']}.{spec['group']}")
    for key in ("plural", "singular"):
        if names.get(key) != names.get(key, "").lower():
            errs.append(f"names.{key} must be lowercase")
    stored = [v["name"] for v in spec["versions"] if v.get("storage")]
    if len(stored) != 1:
        errs.append(f"exactly one version must be stored, not {stored}")
    for v in spec["versions"]:
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        if not schema or schema.get("type") != "object":
            errs.append(f"{v['name']}: openAPIV3Schema must be a structural schema of type object")
        elif "status" in schema.get("properties", {}) and "status" not in (v.get("subresources") or {}):
            errs.append(f"{v['name']}: a status without the status subresource")
    return errs


# -- same --------------------------------------------------------------------

HELM_KEYS = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "helm.sh/chart",
    "helm.sh/resource-policy",
    # Helm's way to restart the federation when the sidecar template
    # changes (kustomize's template differs by design, below).
    "checksum/sidecar-injector",
}


def strip_helm(x):
    if isinstance(x, dict):
        out = {k: strip_helm(v) for k, v in x.items() if k not in HELM_KEYS}
        out = {k: v for k, v in out.items() if v != {} or k == "status"}
        # A strategic-merge patch may reorder these lists (kustomize puts
        # patched entries of env first); their order means nothing, except
        # for env entries that refer to earlier ones with $(VAR).
        for k in ("env", "volumeMounts", "volumes"):
            if isinstance(out.get(k), list) and "$(" not in json.dumps([e.get("value") for e in out[k]]):
                out[k] = sorted(out[k], key=lambda e: e.get("name", e.get("mountPath", "")))
        return out
    if isinstance(x, list):
        return [strip_helm(v) for v in x]
    return x


def normalize(docs, skip):
    out = {}
    for d in docs:
        if kn(d) in skip:
            continue
        d = strip_helm(d)
        out[kn(d)] = d
    return out


def cmd_same(args):
    a_path, b_path = args[0], args[1]
    # Not in the chart (the namespace is Helm's --create-namespace), or
    # different by design (the kustomize template takes the cluster's
    # settings from a ConfigMap, the chart's writes them in).
    skip = {"Namespace/None/fedmesh-system", "Namespace/fedmesh-system", "ConfigMap/fedmesh-system/fedmesh-sidecar-injector"}
    a, b = normalize(load_all(a_path), skip), normalize(load_all(b_path), skip)
    bad = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            bad.append(f"{k} only in {a_path if k in a else b_path}")
        elif a[k] != b[k]:
            bad.append(f"{k} differs: {first_difference(a[k], b[k])}")
    for line in bad:
        print(f"FAIL {line}")
    if not bad:
        print(f"  same {len(a)} objects in {a_path} and {b_path} (Helm's labels aside)")
    return 1 if bad else 0


def first_difference(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}"


# -- sidecar -----------------------------------------------------------------


def cmd_sidecar(args):
    docs = load_all(args[0])
    template_docs = docs + (load_all(args[1]) if len(args) > 1 else [])
    opted = {
        d["metadata"]["name"]
        for d in docs
        if d.get("kind") == "Namespace" and (d["metadata"].get("labels") or {}).get("fedmesh.io/inject") == "enabled"
    }
    template = None
    for d in template_docs:
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "fedmesh-sidecar-injector":
            template = yaml.safe_load(d["data"]["patch.yaml"])["spec"]["template"]["spec"]
    bad, n = [], 0
    for d in docs:
        if d.get("kind") != "Deployment" or d["metadata"].get("namespace") not in opted:
            continue
        n += 1
        pod = d["spec"]["template"]["spec"]
        agent = [c for c in pod["containers"] if c["name"] == "fedmesh-agent"]
        if not agent:
            bad.append(f"{kn(d)}: in an opted-in namespace without the fedmesh-agent sidecar")
            continue
        meta = d["spec"]["template"]["metadata"]
        if "app.kubernetes.io/name" not in (meta.get("labels") or {}):
            bad.append(f"{kn(d)}: its Pod lacks the label app.kubernetes.io/name the sidecar takes its service from")
        if not re.fullmatch(r"[0-9]{1,5}", str((meta.get("annotations") or {}).get("fedmesh.io/app-port", ""))):
            bad.append(f"{kn(d)}: its Pod lacks the annotation fedmesh.io/app-port (a port number)")
        if template is None:
            bad.append(f"no fedmesh-sidecar-injector ConfigMap to compare {kn(d)} with")
        else:
            for field in ("containers", "initContainers", "volumes"):
                want = [unhash(x) for x in template.get(field, [])]
                names = {x["name"] for x in want}
                have = [unhash(x) for x in pod.get(field, []) if x["name"] in names]
                if have != want:
                    bad.append(f"{kn(d)}: its {field} differ from the template: {first_difference(have, want)}")
    for line in bad:
        print(f"FAIL {line}")
    if not opted:
        print(f"FAIL {args[0]}: no namespace labelled fedmesh.io/inject=enabled")
        return 1
    if bad:
        return 1
    print(
        f"  {args[0]}: {n} Deployment(s) in opted-in namespaces ({', '.join(sorted(opted))}) carry the sidecar,"
        " as the fedmesh-sidecar-injector template has it"
    )
    return 0


def unhash(x):
    """The container as the template has it: kustomize appends a content
    hash to the generated ConfigMap's name where it is referenced."""
    x = json.loads(json.dumps(x))
    for ref in x.get("envFrom", []):
        if "configMapRef" in ref:
            ref["configMapRef"]["name"] = re.sub(r"-[a-z0-9]{10}$", "", ref["configMapRef"]["name"])
    return x


# -- break -------------------------------------------------------------------


def cmd_break(args):
    src, out, kind, name, path, value = args
    docs = load_all(src)
    for d in docs:
        if d.get("kind") == kind and d["metadata"]["name"] == name:
            keys = path.split(".")
            node = d
            for k in keys[:-1]:
                node = node[k]
            if value == "DELETE":
                del node[keys[-1]]
            else:
                node[keys[-1]] = json.loads(value)
            dump_all(docs, out)
            return 0
    sys.exit(f"deploy_render.py break: no {kind} {name} in {src}")


COMMANDS = {
    "helm": cmd_helm,
    "kustomize": cmd_kustomize,
    "validate": cmd_validate,
    "same": cmd_same,
    "sidecar": cmd_sidecar,
    "break": cmd_break,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
