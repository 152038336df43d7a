{{- define "agentry.name" -}}agentry{{- end -}}
{{- define "agentry.labels" -}}
app.kubernetes.io/name: agentry
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "agentry.selector" -}}
app.kubernetes.io/name: agentry
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{/*
Rules on Agents and the objects the controller creates for them, each verb traced to a call in
src/ (see tests/fixtures/rbac-*.yaml for the rendered result):
- agents: list/watch (the Agent watcher), patch (finalizer JSON patch, discovery labels by
  server-side apply, clearing the revoke annotation). No get, no update.
- agents/status: patch (status by server-side apply: the reconciler's, and the agent API's
  status.registration and Registered condition under field manager agentry-api). No get, no
  update.
- secrets: get (the identity Secret is read before it is rewritten); the rest below.
- secrets, services, serviceaccounts, deployments, statefulsets: list/watch (watch caches,
  label-selected to what the controller manages), create + patch (server-side apply; an apply
  that creates is also authorized as create). The workload is read from the caches: no get.
- deployments, statefulsets: delete (switching between Deployment and StatefulSet when
  spec.state.persistent changes).
- events.k8s.io events: create, patch (kube-runtime's Recorder patches a repeated event's series).
*/}}
{{- define "agentry.agentRules" -}}
- apiGroups: ["agentry.dev"]
  resources: ["agents"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["agentry.dev"]
  resources: ["agents/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# get: before its first apply, an object the watch cache (selected on our label) does not hold
# is read once, so that an object of the same name the Agent did not create is never adopted.
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.api.enabled }}
# Backups: the schedule creates AgentBackups and retention deletes them; the manager and the API
# write their status. AgentRestores are created by users and only read and reported on.
- apiGroups: ["agentry.dev"]
  resources: ["agentbackups"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["agentry.dev"]
  resources: ["agentrestores"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["agentry.dev"]
  resources: ["agentbackups/status", "agentrestores/status"]
  verbs: ["patch"]
{{- end }}
{{- end -}}

{{/* What the Litestream init containers and sidecar share (docs/ha.md). */}}
{{- define "agentry.litestreamContainer" -}}
env:
  - name: LITESTREAM_ACCESS_KEY_ID
    valueFrom: {secretKeyRef: {name: {{ required "litestream.credentialsSecret.name is required with litestream.enabled" .Values.litestream.credentialsSecret.name }}, key: {{ .Values.litestream.credentialsSecret.accessKeyIdKey }}}}
  - name: LITESTREAM_SECRET_ACCESS_KEY
    valueFrom: {secretKeyRef: {name: {{ .Values.litestream.credentialsSecret.name }}, key: {{ .Values.litestream.credentialsSecret.secretAccessKeyKey }}}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
volumeMounts:
  - {name: data, mountPath: /var/lib/agentry}
  - {name: litestream-config, mountPath: /etc/litestream, readOnly: true}
  - {name: litestream-tmp, mountPath: /tmp}
{{- end -}}
