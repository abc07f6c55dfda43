{{/*
Labels of every object: (dict "root" $ "name" "fedmesh-federation" "component" "federation").
The names are fixed (fedmesh-federation, fedmesh-eastwest-gateway, ...):
the federation's --gateway-service and the gateway's and agents'
--federation name them, and one release per cluster is the model.
*/}}
{{- define "fedmesh.labels" -}}
{{ include "fedmesh.selectorLabels" . }}
app.kubernetes.io/part-of: fedmesh
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/* Selector labels: (dict "root" $ "name" "fedmesh-federation" "component" "federation"). */}}
{{- define "fedmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "fedmesh.image" -}}
{{ .root.Values.image.registry }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end }}

{{/*
The federation's API, as the gateway and the agents dial it: TLS, under a
name its serving certificate carries (the --tls-san in federation.yaml).
*/}}
{{- define "fedmesh.federationURL" -}}
https://fedmesh-federation.{{ .Release.Namespace }}.svc:15010
{{- end }}

{{/*
What the gateway and the agents need to enroll with the federation, in one
projected volume (as Kubernetes' own kube-api-access-* volume holds a token
and kube-root-ca.crt), mounted at /var/run/secrets/fedmesh:
  token   a ServiceAccount token for the federation's audience (its
          --kube-token-audience default, fedmesh), which the federation
          checks with TokenReview before its CA signs (--kube-token-file);
  ca.crt  the mesh CA's root(s), from the ConfigMap fedmesh-ca-root of the
          Pod's namespace: the federation's certificate is checked against
          it before the token is sent (--federation-ca).
Until that ConfigMap exists the Pod waits (ContainerCreating).
*/}}
{{- define "fedmesh.federationAccessVolume" -}}
- name: fedmesh-federation-access
  projected:
    sources:
      - serviceAccountToken:
          audience: fedmesh
          expirationSeconds: 3600
          path: token
      - configMap:
          name: fedmesh-ca-root
          items:
            - key: ca.crt
              path: ca.crt
{{- end }}

{{/* --registry: etcd://A,B,C */}}
{{- define "fedmesh.registry" -}}
etcd://{{ join "," (required "etcd.endpoints is required (HOST:PORT list)" .Values.etcd.endpoints) }}
{{- end }}

{{/* Security context of every fedmesh container. */}}
{{- define "fedmesh.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{/*
The agent's sidecar: the container, its init container (transparent
capture) and its volume, as YAML lists for a Pod spec. Everything specific
to a workload comes from the Pod itself:
  label app.kubernetes.io/name        the service name (--service)
  annotation fedmesh.io/app-port      the application's port (--app 127.0.0.1:PORT)
and the downward API (namespace, Pod name, Pod IP, service account). Used by
the fedmesh-sidecar-injector ConfigMap and by the example; a chart that
depends on this one can include them too.
*/}}
{{- define "fedmesh.sidecar.containers" -}}
- name: fedmesh-agent
  image: {{ include "fedmesh.image" (dict "root" . "name" "fedmesh-agent") }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [fedmesh-agent]
  args:
    - --outbound=127.0.0.1:15001
    - --inbound=0.0.0.0:15006
    - --admin=0.0.0.0:15020
    - --capture={{ .Values.agent.capture }}
    - --kube-token-file=/var/run/secrets/fedmesh/token
    - --federation-ca=/var/run/secrets/fedmesh/ca.crt
    - --log-format={{ .Values.agent.logFormat }}
  env:
    - name: FEDMESH_CLUSTER
      value: {{ required "cluster.name is required" .Values.cluster.name | quote }}
    - name: FEDMESH_REGION
      value: {{ required "cluster.region is required" .Values.cluster.region | quote }}
    - name: FEDMESH_ZONE
      value: {{ required "cluster.zone is required" .Values.cluster.zone | quote }}
    - name: FEDMESH_FEDERATION
      value: {{ include "fedmesh.federationURL" . | quote }}
    - name: FEDMESH_TRUST_DOMAIN
      value: {{ .Values.trustDomain | quote }}
    - name: FEDMESH_PROTOCOL
      value: {{ .Values.agent.protocol | quote }}
    - name: FEDMESH_SERVICE
      valueFrom:
        fieldRef:
          fieldPath: metadata.labels['app.kubernetes.io/name']
    - name: APP_PORT
      valueFrom:
        fieldRef:
          fieldPath: metadata.annotations['fedmesh.io/app-port']
    - name: FEDMESH_APP
      value: 127.0.0.1:$(APP_PORT)
    - name: FEDMESH_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: FEDMESH_ID
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: FEDMESH_ADDRESS
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: FEDMESH_SERVICE_ACCOUNT
      valueFrom:
        fieldRef:
          fieldPath: spec.serviceAccountName
  ports:
    - name: mesh-inbound
      containerPort: 15006
      protocol: TCP
    - name: mesh-admin
      containerPort: 15020
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /ready
      port: 15020
    periodSeconds: 5
  livenessProbe:
    httpGet:
      path: /healthz
      port: 15020
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml .Values.agent.resources | nindent 4 }}
  securityContext:
    {{- include "fedmesh.securityContext" . | nindent 4 }}
    # The iptables rule leaves this user's own connections alone.
    runAsUser: 1337
    runAsGroup: 1337
  volumeMounts:
    - name: fedmesh-federation-access
      mountPath: /var/run/secrets/fedmesh
      readOnly: true
{{- end }}

{{- define "fedmesh.sidecar.initContainers" -}}
{{- if eq .Values.agent.capture "transparent" }}
- name: fedmesh-init
  image: {{ include "fedmesh.image" (dict "root" . "name" "fedmesh-agent") }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # Redirect the Pod's outbound TCP to the agent's outbound listener, except
  # the agent's own (uid 1337) and loopback; and TCP arriving for the
  # application's port to the agent's inbound listener (docs/agent.md,
  # "Capture"; the same rules as the kustomize component's, tested in
  # mesh-agent/tests/transparent.rs).
  env:
    - name: APP_PORT
      valueFrom:
        fieldRef:
          fieldPath: metadata.annotations['fedmesh.io/app-port']
  command:
    - sh
    - -c
    - >-
      iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1/32 -j RETURN &&
      iptables -t nat -A OUTPUT -p tcp -m owner --uid-owner 1337 -j RETURN &&
      iptables -t nat -A OUTPUT -p tcp -j REDIRECT --to-ports 15001 &&
      iptables -t nat -N FEDMESH_INBOUND &&
      iptables -t nat -A PREROUTING -p tcp -j FEDMESH_INBOUND &&
      iptables -t nat -A FEDMESH_INBOUND -p tcp --dport "$APP_PORT" -j REDIRECT --to-ports 15006
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    runAsNonRoot: false
    runAsUser: 0
    capabilities:
      add: [NET_ADMIN, NET_RAW]
      drop: [ALL]
{{- end }}
{{- end }}

{{- define "fedmesh.sidecar.volumes" -}}
# The agent's way in to the federation: a ServiceAccount token for its
# audience, and the mesh CA's root(s) from the ConfigMap fedmesh-ca-root,
# which must exist in the workload's namespace.
{{ include "fedmesh.federationAccessVolume" . }}
{{- end }}
