{{- define "omega.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; fullnameOverride replaces it, nameOverride replaces the chart name in it. */}}
{{- define "omega.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "omega.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "omega.operatorName" -}}
{{- printf "%s-operator" (include "omega.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "omega.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "omega.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Selector labels. app.kubernetes.io/name=omega-operator is what the shards' NetworkPolicies
admit, so name overrides change object names, never this label. */}}
{{- define "omega.selectorLabels" -}}
app.kubernetes.io/name: omega-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "omega.labels" -}}
{{ include "omega.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: omega
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
The operator's rules that only watch and read, or write its own custom resources and Events:
cluster-wide when no namespace is watched (docs/operator.md#rbac).
*/}}
{{- define "omega.rbac.watchRules" -}}
# Shards are created and deleted by users; the operator watches them and applies its
# finalizer.
- apiGroups: ["omega.exogenesis.io"]
  resources: ["shards"]
  verbs: ["list", "watch", "patch"]
# Scheduled parents create child rounds (server-side apply) and delete them for history and
# ttlSecondsAfterFinished.
- apiGroups: ["omega.exogenesis.io"]
  resources: ["federationrounds"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["omega.exogenesis.io"]
  resources: ["shards/status", "federationrounds/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch"]
# Readiness, stats endpoints, stuck images, federation termination messages.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch"]
# patch: kube's event recorder updates the series of an Event that repeats.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The operator's writes (and Secret reads) in the namespaces of its Shards: in the ClusterRole
unless rbac.namespaces lists those namespaces, then a Role in each.
*/}}
{{- define "omega.rbac.writeRules" -}}
# Servers and managed Postgres; deleted in order behind the Shard's finalizer.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["create", "patch", "delete"]
# Generated Secrets are read so their values survive reconciles.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch"]
# volumePolicy: Delete; create/patch: the managed database's backup volume (spec.backup).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["create", "patch", "list", "deletecollection"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "patch"]
# The managed database's pg_dump schedule (spec.backup); deleted when backups are turned off.
- apiGroups: ["batch"]
  resources: ["cronjobs"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["postgresql.cnpg.io"]
  resources: ["clusters"]
  verbs: ["create", "patch", "delete"]
- apiGroups: ["postgresql.cnpg.io"]
  resources: ["scheduledbackups"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["create", "patch"]
{{- end }}
